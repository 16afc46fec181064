# Accepts and closes (results/connect/profile.sh); the pod address exists only in netns plf.
import socket
l = socket.socket()
l.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
l.bind(("10.244.77.1", 8080))
l.listen(4096)
while True:
    c, _ = l.accept()
    c.close()
