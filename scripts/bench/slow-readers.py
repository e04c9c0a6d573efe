# Memory of search pages waiting for slow readers (docs/performance.md): a fresh `serve`, 40
# Patients of 4 MB each, then 8 raw connections send `GET /Patient?_count=1000` with a 4 KiB
# receive buffer and read nothing; prints the server's VmHWM / VmRSS after the load and after 5 s.
#
#   python3 scripts/bench/slow-readers.py FHIRHOSE_BIN PORT
import atexit, json, random, socket, string, subprocess, sys, tempfile, time, urllib.request
bin_, port = sys.argv[1], int(sys.argv[2])
data = tempfile.mkdtemp(prefix="fhirhose-slow-readers-")
srv = subprocess.Popen([bin_, "serve", "--data-dir", data, "--listen", f"127.0.0.1:{port}"],
                       stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
atexit.register(lambda: (srv.terminate(), srv.wait(), subprocess.run(["rm", "-rf", data])))
base = f"http://127.0.0.1:{port}"
for _ in range(100):
    try:
        urllib.request.urlopen(base + "/metadata"); break
    except Exception: time.sleep(0.2)
rnd = random.Random(1)
for i in range(40):
    ext = [{"url": "http://x/big", "valueString": "".join(rnd.choices(string.ascii_letters, k=800_000))} for _ in range(5)]
    body = json.dumps({"resourceType": "Patient", "id": f"p{i}", "extension": ext}).encode()
    req = urllib.request.Request(f"{base}/Patient/p{i}", data=body, method="PUT",
                                 headers={"content-type": "application/fhir+json"})
    urllib.request.urlopen(req).read()
def hwm():
    for line in open(f"/proc/{srv.pid}/status"):
        if line.startswith(("VmHWM", "VmRSS")): print(line.strip(), end="  ")
    print()
print("after load:", end=" "); hwm()
socks = []
for _ in range(8):
    s = socket.create_connection(("127.0.0.1", port))
    s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    s.sendall(f"GET /Patient?_count=1000 HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\n\r\n".encode())
    socks.append(s)
time.sleep(5)
print("8 pages held:", end=" "); hwm()
for s in socks: s.close()
