# Connects to a target one after the other and closes at once (results/connect/profile.sh).
import socket, sys, time
target = (sys.argv[1], int(sys.argv[2]))
n = int(sys.argv[3])
t = time.time()
for i in range(n):
    s = socket.socket()
    s.connect(target)
    s.close()
print(round(n / (time.time() - t)), "connects/s")
