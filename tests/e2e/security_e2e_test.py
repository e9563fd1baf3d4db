"""e2e: TLS, mutual TLS and bearer tokens on the real attnserve binary.

Certificates are made at test time with `openssl`: a CA, a server
certificate for 127.0.0.1/localhost, a client certificate the CA signed and
one a second (untrusted) CA signed. Three servers run on loopback:

- TLS with bearer tokens: plaintext clients cannot connect; calls without a
  token or with a wrong one get UNAUTHENTICATED, the right token computes
  attention; health and reflection answer without a token; attnctl's
  --tls_ca/--token work.
- mutual TLS: a client certificate from the trusted CA is accepted, one from
  the untrusted CA and none at all are refused in the handshake; attnctl's
  --tls_cert/--tls_key work.
- plaintext with bearer tokens (behind a TLS-terminating sidecar).

Misconfigurations (--tls_cert without --tls_key, a short token) make the
server exit at start with a message naming the flag.

Usage: security_e2e_test.py --server=PATH --attnctl=PATH --python_path=DIR --work_dir=DIR
"""

import os
import pathlib
import shutil
import socket
import subprocess
import sys
import time
import unittest

import numpy as np

HERE = pathlib.Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
import harness  # noqa: E402
import numpy_attention  # noqa: E402

ARGS = None
attnserve_client = None
grpc = None

TOKENS = {"alice": "alice-0123456789abcdef", "bob": "bob-fedcba9876543210"}
REFLECTION_METHOD = "/grpc.reflection.v1alpha.ServerReflection/ServerReflectionInfo"


def openssl(*args, cwd):
    subprocess.run(["openssl", *args], cwd=cwd, check=True, capture_output=True)


def make_pki(d):
    """CA, server and client certificates under d; returns d."""
    d.mkdir(parents=True, exist_ok=True)
    (d / "server.ext").write_text("subjectAltName=IP:127.0.0.1,DNS:localhost\n")
    (d / "client.ext").write_text("extendedKeyUsage=clientAuth\n")
    for ca in ("ca", "rogue-ca"):
        openssl("req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "2",
                "-subj", f"/CN=attnserve e2e {ca}", "-keyout", f"{ca}.key", "-out", f"{ca}.pem",
                cwd=d)
    for name, ca, ext, cn in (("server", "ca", "server.ext", "localhost"),
                              ("client", "ca", "client.ext", "e2e-client"),
                              ("rogue-client", "rogue-ca", "client.ext", "e2e-rogue")):
        openssl("req", "-newkey", "rsa:2048", "-nodes", "-subj", f"/CN={cn}",
                "-keyout", f"{name}.key", "-out", f"{name}.csr", cwd=d)
        openssl("x509", "-req", "-in", f"{name}.csr", "-CA", f"{ca}.pem", "-CAkey", f"{ca}.key",
                "-CAcreateserial", "-days", "2", "-extfile", ext, "-out", f"{name}.pem", cwd=d)
    return d


def wait_listening(server, timeout=20.0):
    """Waits until `server` accepts TCP connections: a gRPC channel that tries
    before then backs off for seconds."""
    give_up = time.monotonic() + timeout
    while time.monotonic() < give_up:
        if server.proc.poll() is not None:
            raise RuntimeError(f"attnserve exited with {server.proc.returncode}:\n{server.log()}")
        try:
            socket.create_connection(("127.0.0.1", server.port), timeout=1).close()
            return
        except OSError:
            time.sleep(0.02)
    raise TimeoutError(f"attnserve not listening after {timeout} s:\n{server.log()}")


def qkv(seed=0):
    rng = np.random.default_rng(seed)
    return tuple(rng.standard_normal((1, 16, 2, 32)).astype(np.float32) for _ in range(3))


class SecureServer:
    """A ServerProcess with `args`, waited for through a client made by
    `health_client` (health needs no token)."""

    def __init__(self, work, name, args, health_client):
        self.server = harness.ServerProcess(ARGS.server, work / f"{name}.log", args)
        try:
            wait_listening(self.server)
            with health_client(self.server.target) as c:
                self.server.wait_serving(c)
        except Exception:
            self.server.stop()
            raise

    def stop(self):
        return self.server.stop()


class SecurityE2ETest(unittest.TestCase):
    @classmethod
    def setUpClass(cls):
        cls.work = pathlib.Path(ARGS.work_dir)
        if cls.work.exists():
            shutil.rmtree(cls.work)
        cls.pki = make_pki(cls.work / "pki")
        cls.tokens_file = cls.work / "tokens"
        cls.tokens_file.write_text(
            "# name token\n" + "".join(f"{n} {t}  # {n}'s service\n" for n, t in TOKENS.items()))
        pki = cls.pki
        cls.servers = []
        try:
            cls.tls = SecureServer(cls.work, "tls", [
                f"--tls_cert={pki / 'server.pem'}", f"--tls_key={pki / 'server.key'}",
                f"--auth_tokens_file={cls.tokens_file}"], cls.tls_client)
            cls.servers.append(cls.tls)
            cls.mtls = SecureServer(cls.work, "mtls", [
                f"--tls_cert={pki / 'server.pem'}", f"--tls_key={pki / 'server.key'}",
                f"--tls_client_ca={pki / 'ca.pem'}"],
                lambda target: cls.tls_client(target, cert="client"))
            cls.servers.append(cls.mtls)
            cls.plain = SecureServer(cls.work, "plain", [f"--auth_tokens_file={cls.tokens_file}"],
                                     lambda target: attnserve_client.Client(target, timeout=10))
            cls.servers.append(cls.plain)
        except Exception:
            cls.tearDownClass()
            raise

    @classmethod
    def tearDownClass(cls):
        for s in cls.servers:
            s.stop()

    @classmethod
    def tls_client(cls, target, cert=None, token=None, ca="ca"):
        kwargs = {}
        if cert:
            kwargs = {"cert_file": str(cls.pki / f"{cert}.pem"),
                      "key_file": str(cls.pki / f"{cert}.key")}
        creds = attnserve_client.tls_credentials(ca_file=str(cls.pki / f"{ca}.pem"), **kwargs)
        return attnserve_client.Client(target, credentials=creds, token=token, timeout=10)

    def assert_code(self, code, fn):
        with self.assertRaises(grpc.RpcError) as caught:
            fn()
        self.assertEqual(caught.exception.code(), code, caught.exception.details())
        return caught.exception

    def attend_ok(self, client):
        q, k, v = qkv()
        r = client.attend(q, k, v)
        want, _ = numpy_attention.attention(q, k, v)
        np.testing.assert_allclose(r.output, want, rtol=1e-5, atol=1e-5)

    # --- TLS with bearer tokens ---------------------------------------------

    def test_tls_right_token_computes(self):
        for name, token in TOKENS.items():
            with self.subTest(caller=name), self.tls_client(self.tls.server.target,
                                                            token=token) as c:
                self.attend_ok(c)
                self.assertTrue(c.server_info().version)

    def test_tls_wrong_or_missing_token_is_unauthenticated(self):
        for token in (None, "alice-0123456789abcdeX", "alice-0123456789abcdef0", "x", "",
                      TOKENS["alice"][:-1]):
            with self.subTest(token=token), self.tls_client(self.tls.server.target,
                                                            token=token) as c:
                q, k, v = qkv()
                self.assert_code(grpc.StatusCode.UNAUTHENTICATED, lambda: c.attend(q, k, v))
                self.assert_code(grpc.StatusCode.UNAUTHENTICATED, c.server_info)
        # Not a bearer token at all, and a different scheme.
        with self.tls_client(self.tls.server.target) as c:
            for value in (TOKENS["alice"], f"Basic {TOKENS['alice']}"):
                with self.subTest(authorization=value):
                    self.assert_code(grpc.StatusCode.UNAUTHENTICATED, lambda: c._stub.GetServerInfo(
                        attnserve_client.attention_pb2.GetServerInfoRequest(),
                        metadata=[("authorization", value)], timeout=10))
            # The scheme is case-insensitive (RFC 6750).
            c._stub.GetServerInfo(attnserve_client.attention_pb2.GetServerInfoRequest(),
                                  metadata=[("authorization", f"bearer {TOKENS['bob']}")],
                                  timeout=10)

    def test_tls_health_and_reflection_need_no_token(self):
        with self.tls_client(self.tls.server.target) as c:
            self.assertEqual(c.health(), "SERVING")
            # ServerReflectionInfo with list_services="" (field 7), as raw bytes.
            call = c._channel.stream_stream(REFLECTION_METHOD)
            responses = list(call(iter([b"\x3a\x00"]), timeout=10))
            self.assertEqual(len(responses), 1)
            self.assertIn(b"attnserve.v1.AttentionService", responses[0])

    def test_tls_refuses_plaintext_clients(self):
        with attnserve_client.Client(self.tls.server.target, timeout=3) as c:
            self.assert_code(grpc.StatusCode.UNAVAILABLE, c.health)

    def test_tls_server_not_trusted_without_its_ca(self):
        with self.tls_client(self.tls.server.target, token=TOKENS["alice"], ca="rogue-ca") as c:
            self.assert_code(grpc.StatusCode.UNAVAILABLE, c.server_info)

    def test_attnctl_tls_and_token(self):
        base = [ARGS.attnctl, f"--target={self.tls.server.target}",
                f"--tls_ca={self.pki / 'ca.pem'}", "--deadline=10s"]
        ok = subprocess.run([*base, f"--token={TOKENS['bob']}", "info"], capture_output=True,
                            text=True, timeout=30)
        self.assertEqual(ok.returncode, 0, ok.stderr)
        env = dict(os.environ, ATTNSERVE_TOKEN=TOKENS["alice"])
        from_env = subprocess.run([*base, "info"], capture_output=True, text=True, timeout=30,
                                  env=env)
        self.assertEqual(from_env.returncode, 0, from_env.stderr)
        wrong = subprocess.run([*base, "--token=not-the-right-token-at-all", "info"],
                               capture_output=True, text=True, timeout=30)
        self.assertNotEqual(wrong.returncode, 0)
        self.assertIn("UNAUTHENTICATED", wrong.stderr)
        health = subprocess.run([*base, "health"], capture_output=True, text=True, timeout=30)
        self.assertEqual(health.returncode, 0, health.stderr)
        self.assertIn("SERVING", health.stdout)

    # --- mutual TLS -----------------------------------------------------------

    def test_mtls_accepts_a_certificate_from_the_trusted_ca(self):
        with self.tls_client(self.mtls.server.target, cert="client") as c:
            self.attend_ok(c)

    def test_mtls_rejects_an_untrusted_or_missing_client_certificate(self):
        for cert in ("rogue-client", None):
            with self.subTest(cert=cert), self.tls_client(self.mtls.server.target,
                                                          cert=cert) as c:
                e = self.assert_code(grpc.StatusCode.UNAVAILABLE, c.server_info)
                self.assertNotIn("version", e.details() or "")
                # Probes need a certificate too: mTLS is the transport itself.
                self.assert_code(grpc.StatusCode.UNAVAILABLE, c.health)

    def test_attnctl_mtls(self):
        base = [ARGS.attnctl, f"--target={self.mtls.server.target}",
                f"--tls_ca={self.pki / 'ca.pem'}", "--deadline=10s", "info"]
        ok = subprocess.run([*base, f"--tls_cert={self.pki / 'client.pem'}",
                             f"--tls_key={self.pki / 'client.key'}"], capture_output=True,
                            text=True, timeout=30)
        self.assertEqual(ok.returncode, 0, ok.stderr)
        rogue = subprocess.run([*base, f"--tls_cert={self.pki / 'rogue-client.pem'}",
                                f"--tls_key={self.pki / 'rogue-client.key'}"],
                               capture_output=True, text=True, timeout=30)
        self.assertNotEqual(rogue.returncode, 0)
        self.assertIn("UNAVAILABLE", rogue.stderr)
        half = subprocess.run([*base, f"--tls_cert={self.pki / 'client.pem'}"],
                              capture_output=True, text=True, timeout=30)
        self.assertNotEqual(half.returncode, 0)
        self.assertIn("tls_key", half.stderr)

    # --- plaintext with bearer tokens ------------------------------------------

    def test_plaintext_tokens(self):
        target = self.plain.server.target
        with attnserve_client.Client(target, token=TOKENS["alice"], timeout=10) as c:
            self.attend_ok(c)
        with attnserve_client.Client(target, token="wrong-token-wrong-token", timeout=10) as c:
            self.assert_code(grpc.StatusCode.UNAUTHENTICATED, c.server_info)
            self.assertEqual(c.health(), "SERVING")
        with attnserve_client.Client(target, timeout=10) as c:
            q, k, v = qkv()
            stream = c.attend_stream([attnserve_client.build_request(q, k, v, request_id="s")])
            self.assert_code(grpc.StatusCode.UNAUTHENTICATED, lambda: list(stream))

    # --- misconfiguration -------------------------------------------------------

    def test_bad_configuration_fails_at_start(self):
        short = self.work / "short-tokens"
        short.write_text("carol short\n")
        cases = [
            ([f"--tls_cert={self.pki / 'server.pem'}"], "tls_key"),
            ([f"--tls_client_ca={self.pki / 'ca.pem'}"], "tls_client_ca_file"),
            ([f"--auth_tokens_file={short}"], "at least 16 characters"),
            ([f"--auth_tokens_file={self.work / 'missing'}"], "auth_tokens_file"),
            ([f"--tls_cert={self.pki / 'server.key'}", f"--tls_key={self.pki / 'server.key'}"],
             "tls_cert_file"),
            ([f"--tls_cert={self.pki / 'server.pem'}", f"--tls_key={self.pki / 'server.pem'}"],
             "tls_key_file"),
        ]
        for args, message in cases:
            with self.subTest(args=args):
                r = subprocess.run([ARGS.server, "--listen=127.0.0.1:0", "--metrics_listen=",
                                    *args], capture_output=True, text=True, timeout=30)
                self.assertEqual(r.returncode, 1, r.stderr)
                self.assertIn(message, r.stderr)


def main():
    harness.run_e2e(globals(), ("--attnctl", {"required": True}))


if __name__ == "__main__":
    main()
