import sys, time, uuid, kombu, carrot_kombu
scheme = sys.argv[1]; N = 20
Q = 'rt17-p6b-' + uuid.uuid4().hex[:6]
u = f'{scheme}://guest:guest@127.0.0.1:5672//'
topts = {'client_properties': {'connection_name': 'rt17-p6b'}}
with kombu.Connection(u, transport_options=topts) as c: kombu.Queue(Q, routing_key=Q)(c.default_channel).declare()
to = 0; got = 0; t0 = time.time()
for i in range(N):
    c = kombu.Connection(u, transport_options=topts); c.connect()
    c.Producer().publish({'i': i}, routing_key=Q)
    cons = c.Consumer(kombu.Queue(Q, routing_key=Q), callbacks=[lambda b, m: m.ack()]); cons.consume()
    t = time.time()
    try: c.drain_events(timeout=2); got += 1
    except Exception as e: to += 1; print(i, type(e).__name__, round(time.time()-t, 2))
    del c, cons
print(f'RESULT {scheme} got={got} timeouts={to} {time.time()-t0:.1f}s')
with kombu.Connection('pyamqp://guest:guest@127.0.0.1:5672//') as a: print('left', a.default_channel.queue_declare(Q, passive=True).message_count); a.default_channel.queue_delete(Q)
import os; os._exit(0)
