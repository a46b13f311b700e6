#!/usr/bin/env python3
"""Writes the seed corpus: fuzz/corpus/<target>/<name>, a few meaningful inputs per target.

Run it after changing a target's input format: `python3 fuzz/seeds.py`. It overwrites the files it
writes and leaves any others alone (inputs a fuzzing run was asked to keep, `run.sh --grow`). The svid
seeds need the `openssl` command; without it they are left as they are. Binary formats (the HBONE
script, ZDS packets, protobuf) are encoded here by hand, following the targets' module docs and the
.proto files in mesh-xds/proto.
"""

import os
import shutil
import struct
import subprocess
import sys
import tempfile

FUZZ = os.path.dirname(os.path.abspath(__file__))
CORPUS = os.path.join(FUZZ, "corpus")
REPO = os.path.dirname(FUZZ)


def write(target, name, data):
    directory = os.path.join(CORPUS, target)
    os.makedirs(directory, exist_ok=True)
    if isinstance(data, str):
        data = data.encode()
    with open(os.path.join(directory, name), "wb") as f:
        f.write(data)


# --- protobuf, by hand ------------------------------------------------------------------------------


def varint(n):
    out = bytearray()
    while True:
        byte = n & 0x7F
        n >>= 7
        if n:
            out.append(byte | 0x80)
        else:
            out.append(byte)
            return bytes(out)


def field_bytes(number, data):
    if isinstance(data, str):
        data = data.encode()
    return varint(number << 3 | 2) + varint(len(data)) + data


def field_varint(number, value):
    return varint(number << 3) + varint(value)


def msg(*fields):
    return b"".join(fields)


# --- hbone_acceptor ----------------------------------------------------------------------------------

END_STREAM, ACK, END_HEADERS, PADDED = 0x1, 0x1, 0x4, 0x8
DATA, HEADERS, PRIORITY, RST_STREAM, SETTINGS, PING, GOAWAY, WINDOW_UPDATE, CONTINUATION = (
    0x0, 0x1, 0x2, 0x3, 0x4, 0x6, 0x7, 0x8, 0x9)


def hpack_int(first, prefix_bits, value):
    limit = (1 << prefix_bits) - 1
    if value < limit:
        return bytes([first | value])
    out = bytearray([first | limit])
    value -= limit
    while value >= 128:
        out.append(value % 128 | 0x80)
        value //= 128
    out.append(value)
    return bytes(out)


def hpack(headers):
    """Literals without indexing, as the harness encodes `name value` lines."""
    out = bytearray()
    for name, value in headers:
        out += b"\x00" + hpack_int(0, 7, len(name)) + name.encode() + hpack_int(0, 7, len(value)) + value.encode()
    return bytes(out)


def h2_frame(kind, flags, stream, payload=b""):
    return struct.pack(">I", len(payload))[1:] + bytes([kind, flags]) + struct.pack(">I", stream) + payload


# Script records (see fuzz_targets/hbone_acceptor.rs).
def s_frame(kind, flags, stream, payload=b""):
    assert len(payload) < 256
    return bytes([kind, flags, stream, len(payload)]) + payload


def s_headers(flags, stream, headers, op=0x10):
    lines = "".join(f"{name} {value}\n" for name, value in headers).encode()
    assert len(lines) < 256
    return bytes([op, flags, stream, len(lines)]) + lines


def s_pause(tenths):
    return bytes([0x20, tenths])


S_DRAIN, S_CLOSE = b"\x21", b"\x22"
SCRIPT, RAW, ANY_DESTINATION, DRAIN_AT_ONCE = 0x0, 0x1, 0x2, 0x4


def connect(authority):
    return [(":method", "CONNECT"), (":authority", authority)]


def hbone_seeds():
    t = "hbone_acceptor"
    settings = s_frame(SETTINGS, 0, 0)
    settings_ack = s_frame(SETTINGS, ACK, 0)

    def tunnel(authority, stream=1, extra=()):
        return s_headers(END_HEADERS, stream, connect(authority) + list(extra))

    write(t, "echo", bytes([SCRIPT]) + settings + settings_ack + tunnel("10.0.0.2:8080")
          + s_frame(DATA, 0, 1, b"hello") + s_pause(1) + s_frame(DATA, END_STREAM, 1) + s_pause(1) + S_CLOSE)
    write(t, "echo-with-baggage", bytes([SCRIPT]) + settings + tunnel("10.0.0.2:8080", extra=[
        ("baggage", "k8s.namespace.name=default,k8s.deployment.name=client"),
        ("forwarded", 'for="10.0.0.1:40000"'),
        ("traceparent", "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01")])
        + s_frame(DATA, END_STREAM, 1, b"ping"))
    write(t, "refused-401", bytes([SCRIPT]) + settings + tunnel("10.0.0.2:9090"))
    write(t, "dropped-503", bytes([SCRIPT]) + settings + tunnel("10.0.0.2:5000"))
    write(t, "held-slow-upstream", bytes([SCRIPT]) + settings + tunnel("10.0.0.2:7070") + s_pause(50) + S_CLOSE)
    write(t, "other-ip-400", bytes([SCRIPT]) + settings + tunnel("10.0.0.9:8080"))
    write(t, "other-ip-waypoint", bytes([SCRIPT | ANY_DESTINATION]) + settings + tunnel("10.0.0.9:8080")
          + s_frame(DATA, END_STREAM, 1, b"x"))
    write(t, "proxy-port-400", bytes([SCRIPT]) + settings + tunnel("10.0.0.2:15008"))
    write(t, "hostname-double-hbone", bytes([SCRIPT | ANY_DESTINATION]) + settings
          + tunnel("echo.default.svc.cluster.local:8080") + s_frame(DATA, END_STREAM, 1, b"x"))
    write(t, "bad-authority", bytes([SCRIPT]) + settings + tunnel("127.1:8080") + tunnel("[::1]:0", 3))
    write(t, "get-not-connect", bytes([SCRIPT]) + settings + s_headers(END_HEADERS | END_STREAM, 1, [
        (":method", "GET"), (":scheme", "https"), (":path", "/"), (":authority", "10.0.0.2:8080")]))
    write(t, "lower-case-connect", bytes([SCRIPT]) + settings + s_headers(END_HEADERS, 1, [
        (":method", "connect"), (":authority", "10.0.0.2:8080")]))
    write(t, "no-authority", bytes([SCRIPT]) + settings + s_headers(END_HEADERS, 1, [(":method", "CONNECT")]))
    write(t, "continuation", bytes([SCRIPT]) + settings
          + s_headers(0, 1, [(":method", "CONNECT")])
          + s_headers(END_HEADERS, 1, [(":authority", "10.0.0.2:8080")], op=0x11)
          + s_frame(DATA, END_STREAM, 1, b"x"))
    write(t, "control-frames", bytes([SCRIPT]) + s_frame(SETTINGS, 0, 0, struct.pack(">HI", 0x3, 100)
                                                        + struct.pack(">HI", 0x4, 65535))
          + s_frame(PING, 0, 0, b"12345678") + s_frame(WINDOW_UPDATE, 0, 0, struct.pack(">I", 1 << 20))
          + s_frame(PRIORITY, 0, 1, b"\x00\x00\x00\x00\x10") + s_frame(0x0B, 0, 0, b"unknown type")
          + tunnel("10.0.0.2:8080") + s_frame(WINDOW_UPDATE, 0, 1, struct.pack(">I", 1000))
          + s_frame(RST_STREAM, 0, 1, struct.pack(">I", 0x8)))
    write(t, "many-streams", bytes([SCRIPT]) + settings
          + b"".join(tunnel(f"10.0.0.2:{port}", stream) for stream, port in
                     [(1, 8080), (3, 9090), (5, 7070), (7, 5000), (9, 8080), (11, 15001)])
          + s_frame(DATA, END_STREAM, 9, b"last"))
    write(t, "drain-mid-stream", bytes([SCRIPT]) + settings + tunnel("10.0.0.2:8080") + S_DRAIN
          + s_frame(DATA, 0, 1, b"after the GOAWAY") + s_pause(2) + tunnel("10.0.0.2:8080", 3)
          + s_frame(DATA, END_STREAM, 1))
    write(t, "drained-at-once", bytes([SCRIPT | DRAIN_AT_ONCE]) + settings + tunnel("10.0.0.2:8080"))
    write(t, "client-goaway", bytes([SCRIPT]) + settings + tunnel("10.0.0.2:8080")
          + s_frame(GOAWAY, 0, 0, struct.pack(">II", 1, 0)) + s_frame(DATA, 0, 1, b"x"))
    write(t, "idle-keepalive", bytes([SCRIPT]) + settings + tunnel("10.0.0.2:8080") + s_pause(255) + s_pause(255))
    write(t, "silent-after-preface", bytes([SCRIPT]) + s_pause(200))
    write(t, "stream-zero-and-even", bytes([SCRIPT]) + settings + tunnel("10.0.0.2:8080", 0)
          + tunnel("10.0.0.2:8080", 2))
    write(t, "data-on-idle-stream", bytes([SCRIPT]) + settings + s_frame(DATA, 0, 5, b"nobody asked"))
    write(t, "framing-garbage", bytes([SCRIPT]) + settings + b"\xff\xfe" + tunnel("10.0.0.2:8080"))

    # Raw byte streams: whole frames with hand-made HPACK (indexed fields, the dynamic table, padding).
    raw_connect = h2_frame(HEADERS, END_HEADERS, 1, hpack(connect("10.0.0.2:8080")))
    write(t, "raw-echo", bytes([RAW]) + h2_frame(SETTINGS, 0, 0) + raw_connect
          + h2_frame(DATA, END_STREAM, 1, b"hello"))
    indexed = bytes([0x82, 0x87, 0x84]) + b"\x41" + hpack_int(0, 7, 12) + b"10.0.0.2:443"
    write(t, "raw-indexed-get", bytes([RAW]) + h2_frame(SETTINGS, 0, 0)
          + h2_frame(HEADERS, END_HEADERS | END_STREAM, 1, indexed)
          + h2_frame(HEADERS, END_HEADERS | END_STREAM, 3, bytes([0x82, 0x87, 0x84, 0xBE])))
    block = hpack(connect("10.0.0.2:8080"))
    write(t, "raw-padded", bytes([RAW]) + h2_frame(SETTINGS, 0, 0)
          + h2_frame(HEADERS, END_HEADERS | PADDED, 1, bytes([4]) + block + b"\x00" * 4))
    write(t, "raw-huge-length", bytes([RAW]) + h2_frame(SETTINGS, 0, 0) + b"\xff\xff\xff\x00\x00\x00\x00\x00\x01")
    write(t, "raw-table-size", bytes([RAW]) + h2_frame(SETTINGS, 0, 0, struct.pack(">HI", 0x1, 0))
          + h2_frame(HEADERS, END_HEADERS, 1, b"\x3f\xe1\x1f" + block))


# --- zds ---------------------------------------------------------------------------------------------

NET, UTS, DEVNULL = 0, 1, 2
NEW_CONNECTION, RETRY, CTRUNC = 0x10, 0x20, 0x40


def zds_packet(message, fds=0, kind=NET, extra=0):
    return bytes([fds | kind << 2 | extra]) + struct.pack(">H", len(message)) + message


def z_add(uid, name="web-0", namespace="shop", sa="web", info=True):
    body = field_bytes(1, uid)
    if info:
        body += field_bytes(2, msg(field_bytes(1, name), field_bytes(2, namespace), field_bytes(3, sa)))
    return field_bytes(1, body)


def z_del(uid):
    return field_bytes(2, field_bytes(2, uid))


def z_keep(uid):
    return field_bytes(5, field_bytes(1, uid))


Z_SNAPSHOT = field_bytes(3, b"")


def zds_seeds():
    t = "zds"
    write(t, "snapshot-add-del", zds_packet(z_add("a"), 1) + zds_packet(z_add("b"), 1)
          + zds_packet(Z_SNAPSHOT) + zds_packet(z_del("a")) + zds_packet(z_add("c"), 1))
    write(t, "reconnect-reconcile", zds_packet(z_add("a"), 1) + zds_packet(z_add("b"), 1)
          + zds_packet(z_add("c"), 1) + zds_packet(Z_SNAPSHOT)
          + zds_packet(z_add("a"), 1, extra=NEW_CONNECTION) + zds_packet(z_keep("b")) + zds_packet(Z_SNAPSHOT))
    write(t, "del-before-snapshot", zds_packet(z_add("a"), 1) + zds_packet(Z_SNAPSHOT)
          + zds_packet(z_add("a"), 1, extra=NEW_CONNECTION) + zds_packet(z_del("a")) + zds_packet(Z_SNAPSHOT))
    write(t, "failing-add-retried", zds_packet(z_add("fail-1"), 1) + zds_packet(Z_SNAPSHOT)
          + zds_packet(z_add("ok"), 1, extra=RETRY) + zds_packet(z_del("fail-1"), extra=RETRY))
    write(t, "pod-limit", b"".join(zds_packet(z_add(f"p{i}"), 1) for i in range(6)) + zds_packet(Z_SNAPSHOT)
          + zds_packet(z_add("p0"), 1))
    write(t, "sandbox-recreated", zds_packet(z_add("a"), 1) + zds_packet(Z_SNAPSHOT)
          + zds_packet(z_add("a"), 1, UTS) + zds_packet(z_add("a"), 1, NET))
    write(t, "not-a-namespace", zds_packet(z_add("a"), 1, DEVNULL) + zds_packet(Z_SNAPSHOT))
    write(t, "protocol-violations", zds_packet(Z_SNAPSHOT) + zds_packet(z_keep("a")) + zds_packet(Z_SNAPSHOT)
          + zds_packet(Z_SNAPSHOT) + zds_packet(Z_SNAPSHOT))
    write(t, "descriptor-mismatch", zds_packet(z_add("a")) + zds_packet(z_add("a"), 2)
          + zds_packet(z_del("a"), 1) + zds_packet(z_add("a"), 1, extra=CTRUNC) + zds_packet(z_add("a", info=False), 1))
    write(t, "malformed", zds_packet(b"\xff\xff\xff") + zds_packet(b"\x22\x00") + zds_packet(z_add(""), 1)
          + zds_packet(b"") + zds_packet(field_bytes(1, b"\x0a\xff")))
    write(t, "truncated", zds_packet(z_add("a" * 1100), 1) + zds_packet(z_add("b"), 1))
    write(t, "long-uid-error", zds_packet(Z_SNAPSHOT) + zds_packet(z_keep("u" * 1000)))


# --- text targets ------------------------------------------------------------------------------------


def text_seeds():
    for name, text in {
        "istio": "spiffe://cluster.local/ns/default/sa/client",
        "other-domain": "spiffe://example.org/ns/prod/sa/web-frontend",
        "not-istio-path": "spiffe://example.org/workload/1",
        "trust-domain-only": "spiffe://cluster.local",
        "double-slash": "spiffe://cluster.local/ns//sa/x",
        "upper-case": "spiffe://Cluster.Local/ns/default/sa/client",
        "dot-segment": "spiffe://cluster.local/ns/../sa/x",
        "percent": "spiffe://cluster.local/ns/a%2Fb/sa/x",
        "port": "spiffe://cluster.local:8080/ns/default/sa/x",
        "user": "spiffe://user@cluster.local/ns/default/sa/x",
        "query": "spiffe://cluster.local/ns/default/sa/x?y",
        "trailing-slash": "spiffe://cluster.local/ns/default/sa/x/",
    }.items():
        write("spiffe_id", name, text)

    for name, text in {
        "baggage-ztunnel": "k8s.cluster.name=K1,k8s.namespace.name=NS1,k8s.deployment.name=N1,"
                           "service.name=N2,service.version=V1,cloud.region=r,cloud.availability_zone=z",
        "baggage-properties": " k8s.namespace.name = ns ;prop=1 , k8s.job.name=j",
        "baggage-escapes": "k8s.namespace.name=a%2Cb%3Dc,k8s.pod.name=%ZZ",
        "forwarded-ipv4": 'for="198.18.0.1:40000";host=echo.default.svc.cluster.local',
        "forwarded-ipv6": 'for="[2001:db8::1]:443"',
        "forwarded-several": 'for=192.0.2.43, for="[2001:db8:cafe::17]";proto=https;by=203.0.113.43',
        "traceparent": "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01",
        "traceparent-future-version": "01-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01-extra",
        "traceparent-zero-id": "00-00000000000000000000000000000000-b7ad6b7169203331-01",
    }.items():
        write("hbone_headers", name, text)

    for name, text in {
        "ipv4": "198.18.0.2:8080",
        "ipv6": "[2001:db8::2]:80",
        "ipv4-mapped": "[::ffff:10.0.0.1]:80",
        "hostname": "Echo.default.svc.cluster.local:80",
        "hostname-trailing-dot": "echo.default.svc.cluster.local.:80",
        "port-zero": "echo:0",
        "no-port": "echo",
        "short-ipv4": "127.1:80",
        "ipv4-as-number": "2130706433:80",
        "ipv4-hex": "0x7f000001:80",
        "ipv4-octal": "0177.0.0.1:80",
        "userinfo": "user@10.0.0.2:80",
        "scope-id": "[fe80::1%25eth0]:80",
        "port-overflow": "echo:65536",
    }.items():
        write("connect_authority", name, text)


# --- jwt ---------------------------------------------------------------------------------------------


def jwt_seeds():
    t = "jwt"
    header = '{"alg":"EdDSA","kid":"k1"}'
    exp = 1_700_000_000 + 3600
    for name, data in {
        "raw-bearer": b"\x00Bearer eyJhbGciOiJFUzI1NiJ9.eyJpc3MiOiJpc3MtYSJ9.c2ln",
        "raw-alg-none": b"\x00Bearer eyJhbGciOiJub25lIn0.eyJpc3MiOiJpc3MtYSJ9.",
        "raw-basic": b"\x00Basic dXNlcjpwYXNz",
        "raw-two-segments": b"\x00bearer a.b",
        "signed-iss-a": f'\x01{header}\x00{{"iss":"iss-a","sub":"alice","exp":{exp}}}'.encode(),
        "signed-iss-b-audience": f'\x01{header}\x00{{"iss":"iss-b","sub":"bob","aud":["x","svc-b"],'
                                 f'"groups":["dev"],"exp":{exp}}}'.encode(),
        "signed-iss-b-no-audience": f'\x01{header}\x00{{"iss":"iss-b","sub":"bob"}}'.encode(),
        "signed-expired": f'\x01{header}\x00{{"iss":"iss-a","sub":"a","exp":1699999000}}'.encode(),
        "signed-fractional-dates": f'\x01{header}\x00{{"iss":"iss-a","exp":1700000059.9,"nbf":1700000060.5}}'.encode(),
        "signed-negative-exp": f'\x01{header}\x00{{"iss":"iss-a","exp":-1}}'.encode(),
        "signed-not-yet-valid": f'\x01{header}\x00{{"iss":"iss-a","nbf":1800000000}}'.encode(),
        "signed-bad-sub": f'\x01{header}\x00{{"iss":"iss-a","sub":7}}'.encode(),
        "signed-hs256": b'\x01{"alg":"HS256"}\x00{"iss":"iss-a"}',
        "signed-unknown-kid": b'\x01{"alg":"EdDSA","kid":"k9"}\x00{"iss":"iss-a"}',
        "signed-no-kid": b'\x01{"alg":"EdDSA"}\x00{"iss":"iss-a","sub":"s","aud":"svc-b"}',
        "query-token": b"\x02token=TOKEN\n",
        "query-among-others": b"\x02a=1&token=TOKEN&b=2&token=x\nsession=other",
        "query-encoded-name": b"\x02%74oken=TOKEN&to+ken=1\n",
        "cookie-token": b"\x02\nsession=TOKEN; theme=dark",
        "cookie-quoted": b'\x02\ntheme=dark;session="TOKEN"',
        "query-and-cookie": b"\x02token=TOKEN\nsession=TOKEN",
        "jwks-ed25519": b'\x03{"keys":[{"kty":"OKP","crv":"Ed25519","kid":"k1","x":"KEY_X"}]}',
        "jwks-mixed": b'\x03{"keys":[{"kty":"oct","k":"c2VjcmV0"},{"kty":"EC","crv":"P-256","kid":"k1",'
                      b'"x":"Oq8MG4Y4SzYkGSBb4ScNjp77vEUwBzO5P-KbT918Pm4","y":"qcLC76dZK360RUA7hQPkbDtksERj-t7vSpeDj56wNNU"},'
                      b'{"kty":"OKP","crv":"Ed25519","x":"KEY_X","use":"sig"}]}',
        "jwks-wrong-use": b'\x03{"keys":[{"kty":"OKP","crv":"Ed25519","kid":"k1","x":"KEY_X","use":"enc"}]}',
        "jwks-empty": b'\x03{"keys":[]}',
    }.items():
        write(t, name, data)


# --- policy and local_xds YAML -----------------------------------------------------------------------

POLICY_YAML = {
    "allow-principals": """apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata: {name: allow-client, namespace: ns0}
spec:
  selector: {matchLabels: {app: app0}}
  action: ALLOW
  rules:
  - from:
    - source: {principals: ["cluster.local/ns/ns0/sa/sa0"], notNamespaces: [ns2]}
    to:
    - operation: {ports: ["8080"], methods: [GET, POST], paths: ["/api/*"], hosts: ["svc.ns0.svc.cluster.local"]}
    when:
    - key: request.headers[x-token]
      values: ["abc"]
""",
    "deny-l4": """apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata: {name: deny-ext, namespace: istio-system}
spec:
  action: DENY
  rules:
  - from:
    - source: {notNamespaces: [ns0, ns1], ipBlocks: ["10.0.0.0/8"], notIpBlocks: ["10.0.9.0/24"]}
  - to:
    - operation: {notPorts: ["80", "8080"]}
""",
    "jwt-conditions": """apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata: {name: require-jwt, namespace: ns0}
spec:
  targetRefs:
  - {kind: Gateway, group: gateway.networking.k8s.io, name: waypoint}
  rules:
  - from:
    - source: {requestPrincipals: ["iss-0/*"], remoteIpBlocks: ["192.168.0.0/16"]}
    when:
    - {key: "request.auth.claims[groups]", values: [dev]}
    - {key: "request.auth.claims[nested][role]", values: [admin]}
    - {key: request.auth.audiences, values: [aud-0]}
    - {key: source.namespace, notValues: [ns2]}
    - {key: destination.port, values: ["80", "8080"]}
""",
    "custom-audit-dry-run": """apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata: {name: ext-authz, namespace: ns0}
spec:
  action: CUSTOM
  provider: {name: opa}
  rules:
  - to:
    - operation: {paths: ["/admin/*"]}
---
apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata: {name: audit, namespace: ns0}
spec:
  action: AUDIT
  rules:
  - {}
---
apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata:
  name: dry
  namespace: ns0
  annotations: {istio.io/dry-run: "true"}
spec:
  action: DENY
  rules:
  - {}
""",
    "allow-nothing-and-all": """apiVersion: security.istio.io/v1beta1
kind: AuthorizationPolicy
metadata: {name: allow-nothing, namespace: ns1}
spec: {}
---
apiVersion: security.istio.io/v1beta1
kind: AuthorizationPolicy
metadata: {name: allow-all, namespace: ns0}
spec:
  rules:
  - {}
""",
    "service-target": """apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata: {name: svc-policy, namespace: ns0}
spec:
  targetRef: {kind: Service, group: "", name: svc}
  action: DENY
  rules:
  - to:
    - operation: {methods: [DELETE], notPaths: ["/public/*"]}
""",
    "peer-authentication": """apiVersion: security.istio.io/v1
kind: PeerAuthentication
metadata: {name: default, namespace: istio-system}
spec:
  mtls: {mode: STRICT}
---
apiVersion: security.istio.io/v1
kind: PeerAuthentication
metadata: {name: ns, namespace: ns1}
spec:
  mtls: {mode: PERMISSIVE}
---
apiVersion: security.istio.io/v1
kind: PeerAuthentication
metadata: {name: workload, namespace: ns0}
spec:
  selector: {matchLabels: {app: app0}}
  mtls: {mode: UNSET}
  portLevelMtls:
    "8080": {mode: DISABLE}
    "9090": {mode: STRICT}
""",
    "request-authentication": """apiVersion: security.istio.io/v1
kind: RequestAuthentication
metadata: {name: jwt, namespace: ns0}
spec:
  selector: {matchLabels: {app: app0}}
  jwtRules:
  - issuer: iss-0
    audiences: [aud-0]
    jwks: '{"keys":[{"kty":"EC","crv":"P-256","kid":"k1","x":"Oq8MG4Y4SzYkGSBb4ScNjp77vEUwBzO5P-KbT918Pm4","y":"qcLC76dZK360RUA7hQPkbDtksERj-t7vSpeDj56wNNU"}]}'
    fromHeaders: [{name: x-jwt, prefix: "Token "}]
    fromParams: [token]
    outputClaimToHeaders: [{header: x-sub, claim: sub}]
  - issuer: https://issuer.example.com
    jwksUri: https://issuer.example.com/jwks
    timeout: 5s
---
apiVersion: security.istio.io/v1
kind: RequestAuthentication
metadata: {name: waypoint-jwt, namespace: ns0}
spec:
  targetRefs: [{kind: Gateway, group: gateway.networking.k8s.io, name: waypoint}]
  jwtRules:
  - issuer: iss-1
    fromCookies: [session]
""",
    "list": """apiVersion: v1
kind: List
items:
- apiVersion: security.istio.io/v1
  kind: AuthorizationPolicy
  metadata: {name: a, namespace: ns0}
  spec:
    action: DENY
    rules: [{from: [{source: {namespaces: [ns1]}}]}]
- apiVersion: v1
  kind: Service
  metadata: {name: svc, namespace: ns0}
""",
}


def request_prefix(numbers, text):
    """The policy target's first 64 bytes: 8 bytes of numbers, then `METHOD PATH HOST` and header lines."""
    data = bytes(numbers) + text.encode()
    assert len(data) <= 64, text
    return data + b"\n" * (64 - len(data))


def policy_seeds():
    requests = [
        request_prefix([0, 0, 0, 1, 2, 3, 0x1F, 0x90], "GET /api/v1 svc.ns0.svc.cluster.local\nx-token: abc"),
        request_prefix([1, 1, 2, 0, 0, 4, 0, 80], "DELETE /admin//x/../y svc\nx-forwarded-for: 1.2.3.4"),
        request_prefix([2, 5, 1, 9, 9, 9, 0x23, 0x82], "POST /public/%2e%2e/a svc:80"),
    ]
    for i, (name, yaml) in enumerate(POLICY_YAML.items()):
        write("policy", name, requests[i % len(requests)] + yaml.encode())


LOCAL_KUBE_YAML = {
    "kube-authorization-policies": """apiVersion: v1
kind: Namespace
metadata:
  name: shop
  labels: {istio.io/dataplane-mode: ambient}
---
apiVersion: v1
kind: Pod
metadata:
  name: web-0
  namespace: shop
  labels: {app: web}
spec:
  serviceAccountName: web
  nodeName: node-a
  containers:
  - name: web
    ports: [{containerPort: 8080, name: http, protocol: TCP}]
status:
  phase: Running
  podIP: 10.244.1.5
  podIPs: [{ip: 10.244.1.5}]
  conditions: [{type: Ready, status: "True"}]
---
apiVersion: v1
kind: Service
metadata: {name: web, namespace: shop}
spec:
  selector: {app: web}
  clusterIP: 10.96.0.10
  ports: [{port: 80, targetPort: http, name: http}]
---
apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata: {name: allow-frontend, namespace: shop}
spec:
  selector: {matchLabels: {app: web}}
  action: ALLOW
  rules:
  - from:
    - source: {principals: ["cluster.local/ns/shop/sa/frontend"], notIpBlocks: ["10.0.0.0/8"]}
    to:
    - operation: {ports: ["8080"]}
  - from:
    - source: {namespaces: ["monitoring"]}
    to:
    - operation: {methods: [GET]}
---
apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata: {name: deny-legacy, namespace: istio-system}
spec:
  action: DENY
  rules:
  - from:
    - source: {namespaces: [legacy], requestPrincipals: ["*"]}
    when:
    - {key: destination.port, values: ["5432"]}
---
apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata:
  name: dry
  namespace: shop
  annotations: {istio.io/dry-run: "true"}
spec:
  action: DENY
  rules: [{}]
""",
    "kube-peer-authentication": """apiVersion: security.istio.io/v1
kind: PeerAuthentication
metadata: {name: default, namespace: istio-system}
spec:
  mtls: {mode: STRICT}
---
apiVersion: security.istio.io/v1
kind: PeerAuthentication
metadata: {name: db, namespace: shop}
spec:
  selector: {matchLabels: {app: db}}
  mtls: {mode: STRICT}
  portLevelMtls:
    "5432": {mode: PERMISSIVE}
---
apiVersion: v1
kind: Pod
metadata: {name: db-0, namespace: shop, labels: {app: db, istio.io/dataplane-mode: ambient}}
spec: {serviceAccountName: db}
status:
  phase: Running
  podIP: 10.244.1.9
""",
    "kube-service-entry-gateway": """apiVersion: networking.istio.io/v1
kind: ServiceEntry
metadata: {name: external, namespace: shop, labels: {istio.io/use-waypoint: waypoint}}
spec:
  hosts: [api.example.com]
  addresses: [240.240.0.1]
  ports: [{number: 443, name: https, protocol: TLS}]
  resolution: DNS
---
apiVersion: networking.istio.io/v1
kind: ServiceEntry
metadata: {name: static, namespace: shop}
spec:
  hosts: [db.internal]
  addresses: [240.240.0.2/32]
  ports: [{number: 5432, name: tcp, protocol: TCP}]
  resolution: STATIC
  endpoints:
  - {address: 192.0.2.10, labels: {app: db}}
---
apiVersion: gateway.networking.k8s.io/v1
kind: Gateway
metadata:
  name: waypoint
  namespace: shop
  labels: {istio.io/waypoint-for: all}
spec:
  gatewayClassName: istio-waypoint
  listeners: [{name: mesh, port: 15008, protocol: HBONE}]
---
apiVersion: v1
kind: Service
metadata:
  name: waypoint
  namespace: shop
  labels: {gateway.networking.k8s.io/gateway-name: waypoint}
spec:
  clusterIP: 10.96.0.20
  ports: [{port: 15008, name: mesh}]
""",
    "ztunnel-everything": """workloads:
- uid: cluster1//v1/Pod/default/server
  name: server
  namespace: default
  serviceAccount: server
  trustDomain: cluster.local
  workloadIps: ["198.18.0.2", "2001:db8::2"]
  protocol: HBONE
  node: node-b
  network: net1
  clusterId: cluster1
  canonicalName: server
  canonicalRevision: v1
  workloadName: server
  workloadType: deployment
  status: Healthy
  authorizationPolicies: [default/allow]
  locality: {region: r1, zone: z1, subzone: s1}
  waypoint: {destination: "/198.18.0.9", hboneMtlsPort: 15008}
  services:
    "default/echo.default.svc.cluster.local": {80: 8080}
- uid: cluster1//v1/Pod/default/hostnamed
  name: hostnamed
  namespace: default
  hostname: hostnamed.example.com
  protocol: TCP
  networkMode: HostNetwork
  applicationTunnel: {protocol: PROXY, port: 15088}
services:
- name: echo
  namespace: default
  hostname: echo.default.svc.cluster.local
  vips: ["/198.19.0.10", "net1/2001:db8::10"]
  ports: {80: 8080}
  subjectAltNames: [spiffe://cluster.local/ns/default/sa/server]
  loadBalancer: {routingPreferences: [Network, Region, Zone], mode: Failover, healthPolicy: AllowAll}
  ipFamilies: Dual
policies:
- name: allow
  namespace: default
  scope: WorkloadSelector
  action: Allow
  rules:
  - - - principals: [!Prefix "cluster.local/ns/default/", !Suffix "/sa/client"]
        notNamespaces: [!Exact kube-system]
        sourceIps: ["10.0.0.0/8"]
        destinationPorts: [8080]
    - - namespaces: [!Presence []]
""",
    "errors": """workloads:
- uid: x
  name: a
  namespace: default
  workloadIps: ["198.18.0.300"]
---
apiVersion: v1
kind: Frobnicator
metadata: {name: x}
""",
}


def local_xds_seeds():
    data = os.path.join(REPO, "mesh-xds", "tests", "data", "local")
    for name in sorted(os.listdir(data)):
        if name.endswith(".yaml"):
            shutil.copyfile(os.path.join(data, name), os.path.join(CORPUS, "local_xds", name))
    for name, yaml in LOCAL_KUBE_YAML.items():
        write("local_xds", name + ".yaml", yaml)


# --- xDS protos --------------------------------------------------------------------------------------


def ipv4(text):
    return bytes(int(part) for part in text.split("."))


def network_address(address, network=""):
    return msg(field_bytes(1, network), field_bytes(2, address))


def port(service_port, target_port, app_protocol=0):
    return msg(field_varint(1, service_port), field_varint(2, target_port), field_varint(3, app_protocol))


def xds_seeds():
    workload = msg(
        field_bytes(20, "cluster1//v1/Pod/default/server"), field_bytes(1, "server"), field_bytes(2, "default"),
        field_bytes(3, ipv4("198.18.0.2")), field_bytes(3, bytes(16)), field_bytes(4, "net1"), field_varint(5, 1),
        field_bytes(6, "cluster.local"), field_bytes(7, "server"),
        field_bytes(8, msg(field_bytes(2, network_address(ipv4("198.18.0.9"))), field_varint(3, 15008))),
        field_bytes(9, "node-b"), field_bytes(10, "server"), field_bytes(11, "v1"), field_varint(12, 0),
        field_bytes(13, "server"), field_bytes(16, "default/allow"), field_bytes(18, "cluster1"),
        field_bytes(22, msg(field_bytes(1, "default/echo.default.svc.cluster.local"),
                            field_bytes(2, field_bytes(1, port(80, 8080, 1))))),
        field_bytes(24, msg(field_bytes(1, "r1"), field_bytes(2, "z1"))),
    )
    write("xds_address", "workload", field_bytes(1, workload))
    write("xds_address", "workload-hostname", field_bytes(1, msg(
        field_bytes(20, "Kubernetes/networking.istio.io/ServiceEntry/default/ext/api.example.com"),
        field_bytes(1, "ext"), field_bytes(2, "default"), field_bytes(21, "api.example.com"),
        field_bytes(23, msg(field_varint(1, 1), field_varint(2, 15088))),
        field_bytes(19, msg(field_bytes(1, msg(field_bytes(1, "istio-system"),
                                                field_bytes(2, "eastwest.istio-system.svc.cluster.local"))),
                            field_varint(3, 15008))))))
    service = msg(
        field_bytes(1, "echo"), field_bytes(2, "default"), field_bytes(3, "echo.default.svc.cluster.local"),
        field_bytes(4, network_address(ipv4("198.19.0.10"))), field_bytes(4, network_address(bytes(15) + b"\x01", "n")),
        field_bytes(5, port(80, 8080)), field_bytes(5, port(443, 0, 2)),
        field_bytes(6, "spiffe://cluster.local/ns/default/sa/server"),
        field_bytes(7, msg(field_bytes(1, msg(field_bytes(1, "default"), field_bytes(2, "waypoint.default.svc.cluster.local"))),
                           field_varint(3, 15008))),
        field_bytes(8, msg(field_bytes(1, bytes([6, 1, 2])), field_varint(2, 2), field_varint(3, 1))),
        field_varint(9, 3),
    )
    write("xds_address", "service", field_bytes(2, service))
    write("xds_address", "empty", b"")

    def string_match(kind, value):
        return field_bytes(kind, value)

    match = msg(
        field_bytes(1, string_match(1, "default")), field_bytes(2, string_match(2, "kube-")),
        field_bytes(3, string_match(3, "/sa/client")), field_bytes(4, string_match(4, b"")),
        field_bytes(5, msg(field_bytes(1, ipv4("10.0.0.0")), field_varint(2, 8))),
        field_bytes(8, msg(field_bytes(1, bytes(16)), field_varint(2, 128))),
        field_bytes(9, b"\x90\x3f"), field_varint(10, 5201),
        field_bytes(11, msg(field_bytes(1, "default"), field_bytes(2, "client"))),
    )
    policy = msg(field_bytes(1, "allow"), field_bytes(2, "default"), field_varint(3, 2), field_varint(4, 0),
                 field_bytes(5, field_bytes(1, field_bytes(2, match))), field_varint(6, 0))
    write("xds_authorization", "allow-workload-selector", policy)
    write("xds_authorization", "deny-global-dry-run", msg(
        field_bytes(1, "deny"), field_bytes(2, "istio-system"), field_varint(3, 0), field_varint(4, 1),
        field_bytes(5, field_bytes(1, field_bytes(2, field_varint(10, 22)))), field_varint(6, 1)))
    write("xds_authorization", "empty-rule", msg(field_bytes(1, "p"), field_bytes(2, "ns"), field_varint(3, 1),
                                                 field_bytes(5, b"")))


# --- svid --------------------------------------------------------------------------------------------


def svid_seeds():
    if shutil.which("openssl") is None:
        print("seeds.py: no openssl command; the svid seeds are left as they are", file=sys.stderr)
        return
    cases = {
        "istio-ec": ("ec", "-pkeyopt ec_paramgen_curve:P-256", "URI:spiffe://cluster.local/ns/default/sa/client"),
        "two-uris": ("ec", "-pkeyopt ec_paramgen_curve:P-256",
                     "URI:spiffe://cluster.local/ns/a/sa/b,URI:spiffe://cluster.local/ns/c/sa/d"),
        "dns-only": ("ec", "-pkeyopt ec_paramgen_curve:P-384", "DNS:echo.default.svc"),
        "rsa": ("rsa", "-pkeyopt rsa_keygen_bits:2048", "URI:spiffe://example.org/ns/x/sa/y"),
        "ed25519": ("ed25519", "", "URI:spiffe://cluster.local/ns/default/sa/server"),
    }
    with tempfile.TemporaryDirectory() as tmp:
        for name, (algorithm, options, san) in cases.items():
            key, der = os.path.join(tmp, "key.pem"), os.path.join(tmp, name + ".der")
            subprocess.run(["openssl", "genpkey", "-algorithm", algorithm, *options.split(), "-out", key],
                           check=True, capture_output=True)
            subprocess.run(["openssl", "req", "-x509", "-new", "-key", key, "-subj", "/O=meshkit", "-days", "1",
                            "-addext", f"subjectAltName={san}", "-outform", "DER", "-out", der],
                           check=True, capture_output=True)
            with open(der, "rb") as f:
                write("svid", name, f.read())
    write("svid", "garbage", b"\x30\x82\x01\x00not a certificate")


def socks5_seeds():
    greeting = bytes([5, 1, 0])
    for name, data in {
        "connect-ipv4": greeting + bytes([5, 1, 0, 1, 198, 18, 0, 2]) + struct.pack(">H", 8080),
        "connect-ipv6": greeting + bytes([5, 1, 0, 4]) + bytes(15) + b"\x01" + struct.pack(">H", 443),
        "connect-domain": greeting + bytes([5, 1, 0, 3, 30]) + b"echo.default.svc.cluster.local" + struct.pack(">H", 80),
        "several-methods": bytes([5, 3, 2, 1, 0]) + bytes([5, 1, 0, 1, 10, 0, 0, 1, 0, 80]),
        "no-acceptable-method": bytes([5, 1, 2]),
        "bind-and-udp": greeting + bytes([5, 2, 0, 1, 10, 0, 0, 1, 0, 80]),
        "udp-associate": greeting + bytes([5, 3, 0, 1, 0, 0, 0, 0, 0, 0]),
        "port-zero": greeting + bytes([5, 1, 0, 1, 10, 0, 0, 1, 0, 0]),
        "socks4": bytes([4, 1, 0, 80, 10, 0, 0, 1, 0]),
        "empty-domain": greeting + bytes([5, 1, 0, 3, 0, 0, 80]),
        "bad-address-type": greeting + bytes([5, 1, 0, 9, 1, 2, 3, 4, 0, 80]),
    }.items():
        write("socks5", name, data)


def main():
    socks5_seeds()
    hbone_seeds()
    zds_seeds()
    text_seeds()
    jwt_seeds()
    policy_seeds()
    os.makedirs(os.path.join(CORPUS, "local_xds"), exist_ok=True)
    local_xds_seeds()
    xds_seeds()
    svid_seeds()
    for target in sorted(os.listdir(CORPUS)):
        print(f"{target}: {len(os.listdir(os.path.join(CORPUS, target)))} seeds")


if __name__ == "__main__":
    main()
