#!/usr/bin/env python3
"""Decides whether a test service found listening on its port can be reused (standard library only).

Used by scripts/azurite.sh, scripts/s3.sh and scripts/registry.sh; tested by
scripts/tests/stale-services.sh. A listener is reused only when it passes a functional probe
(a write and read round trip through the service's own API) and, when it is one this project's
scripts started, its checkout, program and data folder still exist. A stale listener of ours is
stopped (SIGTERM, SIGKILL after 5 s); anything else on the port is reported, never killed.

Usage: service-check.py KIND PORT COMMAND [--version V] [--pidfile FILE]
  KIND     azurite | s3 | registry
  COMMAND  reuse  exit 0: a working instance answers, reuse it; exit 3: the port is free (a stale
                  instance of ours was stopped, or nothing listened): start one; exit 1: the port
                  is held by something else that does not work for us (message on stderr)
           probe  exit 0 when the functional probe passes, 1 (reason on stderr) otherwise
           stop   stop our instance on the port, if any (exit 1 if something else holds it)
           owner  print "PID<TAB>ours|foreign<TAB>command line" of the listener (exit 1 if none)
"""

import base64
import email.utils
import glob
import hashlib
import hmac
import http.client
import os
import re
import signal
import socket
import sys
import time
import urllib.parse
import uuid

HOST = "127.0.0.1"
TIMEOUT = 3.0
NAMES = {"azurite": "Azurite", "s3": "moto (S3)", "registry": "OCI registry"}

# Azurite's well-known development account (public; documented by Microsoft).
AZ_ACCOUNT = "devstoreaccount1"
AZ_KEY = base64.b64decode(
    "Eby8vdM02xNOcqFlqUwJPLlmEtlCDXJ1OUzFT50uSRZ6IFsuFq2UVErCz4I6tq/K1SZFPTOtr/KBHBeksoGMGw=="
)


class ProbeFailed(Exception):
    pass


def request(port, method, path, body=b"", headers=None):
    conn = http.client.HTTPConnection(HOST, port, timeout=TIMEOUT)
    try:
        conn.request(method, path, body=body, headers=headers or {})
        resp = conn.getresponse()
        return resp.status, dict((k.lower(), v) for k, v in resp.getheaders()), resp.read()
    except (OSError, http.client.HTTPException) as e:
        raise ProbeFailed(f"{method} {path}: {e.__class__.__name__}: {e}") from None
    finally:
        conn.close()


def expect(what, got, want, body=b""):
    if got not in want:
        snippet = body[:200].decode("utf-8", "replace").replace("\n", " ")
        raise ProbeFailed(f"{what} answered HTTP {got} (want {'/'.join(map(str, want))}): {snippet}")


def azure(port, method, path, query=None, body=b"", headers=None):
    """One SharedKey-signed Blob service request (path-style emulator URL)."""
    query = query or {}
    h = {"x-ms-date": email.utils.formatdate(usegmt=True), "x-ms-version": "2021-08-06"}
    h.update(headers or {})
    ms = sorted((k.lower(), v) for k, v in h.items() if k.lower().startswith("x-ms-"))
    to_sign = "\n".join(
        [method, "", "", str(len(body)) if body else "", "", h.get("Content-Type", "")]
        + [""] * 6
    )
    to_sign += "\n" + "".join(f"{k}:{v}\n" for k, v in ms)
    to_sign += f"/{AZ_ACCOUNT}{path}" + "".join(f"\n{k}:{v}" for k, v in sorted(query.items()))
    sig = base64.b64encode(hmac.new(AZ_KEY, to_sign.encode(), hashlib.sha256).digest()).decode()
    h["Authorization"] = f"SharedKey {AZ_ACCOUNT}:{sig}"
    url = path + ("?" + urllib.parse.urlencode(query) if query else "")
    return request(port, method, url, body, h)


def probe_azurite(port, version):
    container = f"/{AZ_ACCOUNT}/fhirhose-probe-{uuid.uuid4().hex[:12]}"
    data = f"probe {uuid.uuid4()}".encode()
    status, hdrs, body = azure(port, "PUT", container, {"restype": "container"})
    server = hdrs.get("server", "")
    if not server.startswith("Azurite-Blob/"):
        raise ProbeFailed(f"not Azurite's blob service (Server: {server or 'none'}; HTTP {status})")
    if version and server != f"Azurite-Blob/{version}":
        raise ProbeFailed(f"{server}, not Azurite-Blob/{version}")
    expect("create container", status, (201,), body)
    try:
        status, _, body = azure(port, "PUT", container + "/probe.txt", body=data,
                                headers={"x-ms-blob-type": "BlockBlob"})
        expect("put blob", status, (201,), body)
        status, _, body = azure(port, "GET", container + "/probe.txt")
        expect("get blob", status, (200,), body)
        if body != data:
            raise ProbeFailed("get blob returned other bytes than were put")
    finally:
        try:
            status, _, body = azure(port, "DELETE", container, {"restype": "container"})
        except ProbeFailed:
            status = None
    expect("delete container", status, (202,), body)


def s3(port, method, path, body=b""):
    """One AWS SigV4-signed request with the test credentials (test/test, us-east-1)."""
    amzdate = time.strftime("%Y%m%dT%H%M%SZ", time.gmtime())
    scope = f"{amzdate[:8]}/us-east-1/s3/aws4_request"
    payload = hashlib.sha256(body).hexdigest()
    h = {"host": f"{HOST}:{port}", "x-amz-content-sha256": payload, "x-amz-date": amzdate}
    signed = ";".join(sorted(h))
    canon = "\n".join([method, path, "", "".join(f"{k}:{h[k]}\n" for k in sorted(h)), signed,
                       payload])
    to_sign = "\n".join(["AWS4-HMAC-SHA256", amzdate, scope,
                         hashlib.sha256(canon.encode()).hexdigest()])
    key = b"AWS4test"
    for part in scope.split("/"):
        key = hmac.new(key, part.encode(), hashlib.sha256).digest()
    sig = hmac.new(key, to_sign.encode(), hashlib.sha256).hexdigest()
    h["Authorization"] = f"AWS4-HMAC-SHA256 Credential=test/{scope}, SignedHeaders={signed}, " \
        f"Signature={sig}"
    return request(port, method, path, body, h)


def probe_s3(port, version):
    bucket = f"/fhirhose-probe-{uuid.uuid4().hex[:12]}"
    data = f"probe {uuid.uuid4()}".encode()
    status, hdrs, body = s3(port, "PUT", bucket)
    expect("create bucket", status, (200,), body)
    try:
        status, _, body = s3(port, "PUT", bucket + "/probe.txt", data)
        expect("put object", status, (200,), body)
        status, _, body = s3(port, "GET", bucket + "/probe.txt")
        expect("get object", status, (200,), body)
        if body != data:
            raise ProbeFailed("get object returned other bytes than were put")
        status, _, body = s3(port, "DELETE", bucket + "/probe.txt")
        expect("delete object", status, (204,), body)
    finally:
        try:
            status, _, body = s3(port, "DELETE", bucket)
        except ProbeFailed:
            status = None
    expect("delete bucket", status, (204,), body)


def probe_registry(port, version):
    status, hdrs, body = request(port, "GET", "/v2/")
    expect("GET /v2/", status, (200,), body)
    if not hdrs.get("docker-distribution-api-version", "").startswith("registry/2"):
        raise ProbeFailed("GET /v2/ answered 200 without Docker-Distribution-Api-Version")
    # A blob upload round trip; random content, so concurrent probes never share a digest.
    repo = "/v2/fhirhose-probe/check/blobs/"
    data = f"probe {uuid.uuid4()}".encode()
    digest = "sha256:" + hashlib.sha256(data).hexdigest()
    status, hdrs, body = request(port, "POST", repo + "uploads/")
    expect("start blob upload", status, (202,), body)
    loc = urllib.parse.urlsplit(hdrs.get("location", ""))
    query = (loc.query + "&" if loc.query else "") + urllib.parse.urlencode({"digest": digest})
    status, _, body = request(port, "PUT", f"{loc.path}?{query}", data,
                              {"Content-Type": "application/octet-stream"})
    expect("finish blob upload", status, (201,), body)
    status, _, body = request(port, "GET", repo + digest)
    expect("get blob", status, (200,), body)
    if body != data:
        raise ProbeFailed("get blob returned other bytes than were put")
    status, _, body = request(port, "DELETE", repo + digest)
    expect("delete blob", status, (202,), body)


PROBES = {"azurite": probe_azurite, "s3": probe_s3, "registry": probe_registry}

# Command lines of the instances this project's scripts start (any checkout, relative or absolute).
OURS = {
    "azurite": re.compile(r"(^|/)\.tools/azurite/node_modules/"),
    "s3": re.compile(r"(^|/)\.tools/moto/venv/bin/(moto_server|python[0-9.]*)$"),
    "registry": re.compile(r"(^|/)\.tools/registry/root/usr/bin/docker-registry$"),
}


def port_open(port):
    try:
        with socket.create_connection((HOST, port), timeout=1):
            return True
    except OSError:
        return False


def listener_pid(port):
    """The pid of the process listening on PORT, from /proc (None if not visible to us)."""
    inodes = set()
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        try:
            with open(table) as f:
                next(f)
                for line in f:
                    cols = line.split()
                    if cols[3] == "0A" and int(cols[1].rsplit(":", 1)[1], 16) == port:
                        inodes.add(cols[9])
        except OSError:
            pass
    if not inodes:
        return None
    targets = {f"socket:[{i}]" for i in inodes}
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            for fd in os.listdir(f"/proc/{pid}/fd"):
                if os.readlink(f"/proc/{pid}/fd/{fd}") in targets:
                    return int(pid)
        except OSError:
            continue
    return None


def cmdline(pid):
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            return [a.decode("utf-8", "replace") for a in f.read().split(b"\0") if a]
    except OSError:
        return []


def link(pid, what):
    try:
        return os.readlink(f"/proc/{pid}/{what}")
    except OSError:
        return ""


def is_ours(kind, pid, pidfile):
    if any(OURS[kind].search(a) for a in cmdline(pid)[:3]):
        return True
    # This checkout's pid file (the scripts run from the checkout's root); the working directory
    # must match too, so that a recycled pid of some other program is never taken for ours.
    try:
        with open(pidfile) as f:
            return int(f.read().strip()) == pid and link(pid, "cwd") == os.getcwd()
    except (OSError, ValueError, TypeError):
        return False


def stale_reason(kind, pid, version):
    """Why an instance of ours cannot be trusted even if it answers now (None if intact)."""
    cwd = link(pid, "cwd")
    if not cwd or cwd.endswith(" (deleted)") or not os.path.isdir(cwd):
        return f"the checkout it was started from ({cwd.removesuffix(' (deleted)') or '?'}) is gone"
    if link(pid, "exe").endswith(" (deleted)"):
        return "its program file was deleted or replaced"
    args = cmdline(pid)
    resolve = lambda p: os.path.join(cwd, p)  # noqa: E731 (absolute p wins in join)
    for a in args[:3]:
        if OURS[kind].search(a) and not os.path.exists(resolve(a)):
            return f"its program {resolve(a)} is gone"
    if kind == "azurite" and "--location" in args[:-1]:
        loc = resolve(args[args.index("--location") + 1])
        if not os.path.isdir(loc):
            return f"its data folder {loc} is gone"
    if kind == "registry" and len(args) >= 3:
        config = resolve(args[2])
        try:
            with open(config) as f:
                m = re.search(r"^\s*rootdirectory:\s*(\S+)", f.read(), re.M)
        except OSError:
            return f"its configuration {config} is gone"
        if m and not os.path.isdir(resolve(m.group(1))):
            return f"its storage folder {resolve(m.group(1))} is gone"
    if kind == "s3" and version:
        venv = next((resolve(a) for a in args[:3] if OURS[kind].search(a)), "").rsplit("/bin/", 1)[0]
        found = glob.glob(f"{venv}/lib/python*/site-packages/moto-*.dist-info")
        have = sorted(re.sub(r".*/moto-(.*)\.dist-info$", r"\1", d) for d in found)
        if venv and have != [version]:
            return f"its moto is {', '.join(have) or 'missing'}, not {version}"
    return None


def describe(pid):
    if pid is None:
        return "a process this user cannot see"
    args = " ".join(cmdline(pid)) or "?"
    cwd = link(pid, "cwd") or "?"
    return f"pid {pid} ({args[:300]}; cwd {cwd})"


def gone(pid):
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] == "Z"  # a zombie no longer listens
    except OSError:
        return True


def stop(pid, kind, port):
    """SIGTERM, SIGKILL after 5 s; then wait for the port to be free."""
    for sig, wait in ((signal.SIGTERM, 5.0), (signal.SIGKILL, 3.0)):
        try:
            os.kill(pid, sig)
        except ProcessLookupError:
            break
        deadline = time.monotonic() + wait
        while time.monotonic() < deadline and not gone(pid):
            time.sleep(0.05)
        if gone(pid):
            break
    deadline = time.monotonic() + 3.0
    while time.monotonic() < deadline and port_open(port):
        time.sleep(0.05)
    if port_open(port):
        raise SystemExit(f"{kind}: stopped pid {pid} but {HOST}:{port} still answers")


def main(argv):
    if len(argv) < 3 or argv[0] not in PROBES:
        sys.exit(__doc__)
    kind, port, command = argv[0], int(argv[1]), argv[2]
    opts = dict(zip(argv[3::2], argv[4::2]))
    version, pidfile = opts.get("--version"), opts.get("--pidfile")
    name = NAMES[kind]

    def probe():
        try:
            PROBES[kind](port, version)
            return None
        except ProbeFailed as e:
            return str(e)

    if command == "probe":
        why = probe()
        if why:
            print(f"{kind}: probe of {HOST}:{port} failed: {why}", file=sys.stderr)
        return 1 if why else 0

    pid = listener_pid(port)
    if pid is None and not port_open(port):
        if command == "owner":
            return 1
        return 3 if command == "reuse" else 0
    ours = pid is not None and is_ours(kind, pid, pidfile)

    if command == "owner":
        print(f"{pid}\t{'ours' if ours else 'foreign'}\t{' '.join(cmdline(pid))}")
        return 0
    if command == "stop":
        if not ours:
            print(f"{kind}: {HOST}:{port} is held by {describe(pid)}, not by these scripts; "
                  "not stopping it", file=sys.stderr)
            return 1
        stop(pid, kind, port)
        print(f"{kind}: stopped pid {pid}")
        return 0
    if command != "reuse":
        sys.exit(__doc__)

    why = (stale_reason(kind, pid, version) if ours else None) or probe()
    if why is None:
        whose = "" if ours else f", not started by these scripts: {describe(pid)}"
        print(f"{kind}: a working {name} already answers on {HOST}:{port} (pid {pid}{whose})")
        return 0
    if ours:
        print(f"{kind}: stopping the stale instance on {HOST}:{port}, {describe(pid)}: {why}")
        stop(pid, kind, port)
        return 3
    print(f"{kind}: {HOST}:{port} is held by {describe(pid)}, which is not a working "
          f"{name}{' ' + version if version else ''} ({why}); it was not started by these "
          "scripts, so it is left alone: stop it or free the port, then rerun", file=sys.stderr)
    return 1


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
