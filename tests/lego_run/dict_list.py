# Builds and checks a large dict and list under lego-run (several times the ExCache).
import hashlib

N = 400_000
d = {}
for i in range(N):
    d["key-%d" % i] = hashlib.sha1(str(i).encode()).hexdigest()
lst = [i * i for i in range(2 * N)]
for i in range(0, N, 997):
    assert d["key-%d" % i] == hashlib.sha1(str(i).encode()).hexdigest(), i
assert sum(lst) == sum(i * i for i in range(2 * N))
assert len(d) == N
del d
print("python ok")
