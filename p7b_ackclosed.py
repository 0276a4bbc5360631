import sys, time, uuid, kombu, carrot_kombu
scheme = sys.argv[1]; PORT = 5697
Q = 'rt17-p7b-' + uuid.uuid4().hex[:6]
conn = kombu.Connection(f'{scheme}://guest:guest@127.0.0.1:{PORT}//', transport_options={'client_properties': {'connection_name': 'rt17-p7b'}})
conn.connect()
q = kombu.Queue(Q, routing_key=Q); q(conn.default_channel).declare()
conn.Producer().publish(b'x', routing_key=Q)
got = []
ch = conn.channel()
c = kombu.Consumer(ch, [q], callbacks=[lambda b, m: got.append(m)]); c.consume()
conn.drain_events(timeout=3)
m = got[0]
ch.close()
for op in ('ack', 'reject', 'requeue'):
    try: getattr(m, op)() if op != 'reject' else m.reject(requeue=False); print(scheme, op, 'after channel close: no error, acknowledged=', m.acknowledged)
    except Exception as e: print(scheme, op, 'after channel close:', type(e).__name__, e)
    m._state = 'RECEIVED'
time.sleep(0.5)
print(scheme, 'queue message_count after (1 means redelivered/not acked):', conn.default_channel.queue_declare(Q, passive=True).message_count)
conn.default_channel.queue_delete(Q)
import os; os._exit(0)
