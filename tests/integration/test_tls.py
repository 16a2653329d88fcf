"""Mutual TLS between real daemons on loopback (issue 9, DESIGN §5 "Identity", "One owner per port").

Every certificate here is real: the shared test CA (daemons.shared_ca), a second CA the daemons do
not trust, expired and not-yet-valid certificates, and a CA made with the openssl command line.
"""

from __future__ import annotations

import datetime as dt
import shutil
import subprocess
import time
from pathlib import Path

import grpc
import pytest
from daemons import AgentSpec, DaemonSet, TestCA, mtl_node_command

from mtl_node.ca import issue, write_private, write_public
from mtl_node.channel import create_sync_channel
from mtl_node.identity import agent_id, load_material
from mtl_node.proto.v1 import node_pb2 as pb
from mtl_node.proto.v1 import node_pb2_grpc as pb_grpc

pytestmark = pytest.mark.integration

RPC_S = 10.0


def get_model(channel: grpc.Channel, round_: int, requester: str) -> tuple[pb.ModelHeader, bytes]:
    chunks = list(
        pb_grpc.NodeStub(channel).GetModel(
            pb.GetModelRequest(round=round_, requester=requester), timeout=RPC_S
        )
    )
    return chunks[0].header, b"".join(c.data for c in chunks)


def as_agent(ca: TestCA, who: str, address: str, target: str) -> grpc.Channel:
    return create_sync_channel(address, tls=ca.material(who), expected_identity=agent_id(target))


def wait_for_text(path_text: object, needle: str, timeout: float = 30.0) -> str:
    """Poll a daemon's stderr until ``needle`` shows up (logs are written asynchronously)."""
    deadline = time.monotonic() + timeout
    text = ""
    while time.monotonic() < deadline:
        text = path_text()  # type: ignore[operator]
        if needle in text:
            return text
        time.sleep(0.1)
    raise AssertionError(f"{needle!r} not logged within {timeout:.0f}s:\n{text[-3000:]}")


def dated_cert(ca: TestCA, name: str, directory: Path, start: dt.datetime, days: float) -> tuple[Path, Path]:
    made = issue(ca.ca, agent_id(name), days=days, not_before=start)
    cert, key = directory / f"{name}-dated.pem", directory / f"{name}-dated.key"
    write_public(cert, made.cert_pem(), force=True)
    write_private(key, made.key_pem(), force=True)
    return cert, key


def test_who_may_connect_and_what_each_identity_may_do(tmp_path: Path, ca: TestCA) -> None:
    rounds = 2
    with DaemonSet(tmp_path, [AgentSpec("s")], rounds, seed=1, rule="none") as ds:
        ds.wait_done(timeout=120)
        address = ds["s"].address

        # An agent fetches a model as itself; the header names the agent it came from.
        with as_agent(ca, "c", address, "s") as channel:
            header, payload = get_model(channel, rounds, "c")
            assert header.agent_id == "s" and header.round == rounds and len(payload) == header.total_bytes
            assert pb_grpc.NodeStub(channel).GetInfo(pb.GetInfoRequest(), timeout=RPC_S).agent_id == "s"
            # ... but not as somebody else, nor read status.
            for requester in ("d", ""):
                with pytest.raises(grpc.RpcError) as denied:
                    get_model(channel, rounds, requester)
                assert denied.value.code() == grpc.StatusCode.PERMISSION_DENIED, requester[:10]
            # Today's 1 MiB requester does not even reach authorization: requests are capped at
            # 64 KiB (mtl_node/limits.py), and the 200-byte one is past the id length bound.
            for requester, code in (
                ("x" * (1 << 20), grpc.StatusCode.RESOURCE_EXHAUSTED),
                ("x" * 200, grpc.StatusCode.INVALID_ARGUMENT),
            ):
                with pytest.raises(grpc.RpcError) as refused:
                    get_model(channel, rounds, requester)
                assert refused.value.code() == code, len(requester)
            with pytest.raises(grpc.RpcError) as denied:
                pb_grpc.NodeStub(channel).GetStatus(pb.GetStatusRequest(), timeout=RPC_S)
            assert denied.value.code() == grpc.StatusCode.PERMISSION_DENIED
        log = wait_for_text(ds["s"].stderr, "refused GetModel from spiffe://resilient-mtl/agent/c")
        assert "requester 'd' is not the caller's identity" in log

        # The operator reads everything: status, and the model with an empty requester.
        with ds.channel("s") as channel:
            assert pb_grpc.NodeStub(channel).GetStatus(pb.GetStatusRequest(), timeout=RPC_S).state == "done"
            header, _ = get_model(channel, rounds, "")
            assert header.agent_id == "s"

        refused: dict[str, grpc.Channel] = {}
        other = TestCA(tmp_path / "other-ca")  # same SAN layout, a CA the daemon does not trust
        refused["another CA"] = create_sync_channel(
            address, tls=other.material("c"), expected_identity=agent_id("s")
        )
        refused["no client certificate"] = grpc.secure_channel(
            address,
            grpc.ssl_channel_credentials(ca.ca_path.read_bytes()),
            options=[("grpc.ssl_target_name_override", "s.agent.resilient-mtl")],
        )
        refused["plaintext"] = create_sync_channel(address, tls=None)
        now = dt.datetime.now(dt.UTC)
        expired = dated_cert(ca, "c", tmp_path, now - dt.timedelta(days=3), days=1)
        future = dated_cert(ca, "d", tmp_path, now + dt.timedelta(days=2), days=1)
        for what, (cert, key) in {"expired": expired, "not yet valid": future}.items():
            creds = grpc.ssl_channel_credentials(ca.ca_path.read_bytes(), key.read_bytes(), cert.read_bytes())
            refused[what] = grpc.secure_channel(
                address, creds, options=[("grpc.ssl_target_name_override", "s.agent.resilient-mtl")]
            )
        for what, channel in refused.items():
            with channel, pytest.raises(grpc.RpcError) as failed:
                pb_grpc.NodeStub(channel).GetInfo(pb.GetInfoRequest(), timeout=RPC_S)
            assert failed.value.code() == grpc.StatusCode.UNAVAILABLE, what
        # The daemon's log says why the handshakes failed (gRPC's TLS layer logs it).
        wait_for_text(ds["s"].stderr, "certificate has expired")
        wait_for_text(ds["s"].stderr, "certificate is not yet valid")


def test_impostor_at_an_agents_address_is_missing_with_reason_identity(tmp_path: Path) -> None:
    """b's daemon (b's valid certificate) answers at a's address: c leaves a out every round with
    reason ``identity``, logs it once, keeps b, and finishes its rounds."""
    rounds = 3
    specs = [AgentSpec("b", ["c"]), AgentSpec("c", ["a", "b"])]
    with DaemonSet(tmp_path, specs, rounds, seed=2, stand_ins={"a": "b"}) as ds:
        ds.wait_done(timeout=180)
        rows = ds["c"].decisions()
        about_a = [r for r in rows if r["neighbor"] == "a"]
        assert [int(r["round"]) for r in about_a] == list(range(1, rounds + 1))
        assert all(r["decision"] == "missing" and r["reason"].startswith("identity: ") for r in about_a), (
            about_a
        )
        assert all(r["decision"] != "missing" for r in rows if r["neighbor"] == "b"), rows
        assert [int(r["round"]) for r in ds["c"].metrics()] == list(range(1, rounds + 1))
        assert ds["c"].stderr().count("left out a: ") == 1


def test_two_faced_attack_serves_each_authenticated_victim(tmp_path: Path, ca: TestCA) -> None:
    """An echo node answers each requester with the requester's own model: with mTLS the
    requester is the caller's certificate, so one victim cannot collect what another is sent."""
    rounds = 2
    specs = [
        AgentSpec("x", ["y", "e"]),
        AgentSpec("y", ["x", "e"]),
        AgentSpec("e", ["x", "y"], args=["--attack", "echo"]),
    ]
    with DaemonSet(tmp_path, specs, rounds, seed=3, save_models_every=0) as ds:
        ds.wait_done(timeout=180)
        own = {}
        for victim in ("x", "y"):
            with ds.channel(victim) as channel:
                own[victim] = get_model(channel, rounds, "")[1]
        assert own["x"] != own["y"]
        for victim in ("x", "y"):
            with as_agent(ca, victim, ds["e"].address, "e") as channel:
                header, payload = get_model(channel, rounds, victim)
                assert header.agent_id == "e"
                assert payload == own[victim], victim
        with as_agent(ca, "y", ds["e"].address, "e") as channel, pytest.raises(grpc.RpcError) as denied:
            get_model(channel, rounds, "x")
        assert denied.value.code() == grpc.StatusCode.PERMISSION_DENIED


def openssl(*args: str, cwd: Path) -> None:
    done = subprocess.run(["openssl", *args], cwd=cwd, capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr


@pytest.mark.skipif(
    shutil.which("openssl") is None, reason="the openssl CLI is not installed (apt-get install openssl)"
)
def test_certificates_made_with_openssl_work(tmp_path: Path) -> None:
    """The SAN layout is the contract: a CA and certificates from the openssl CLI serve a run."""
    d = tmp_path / "openssl"
    d.mkdir()
    ec = ["-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:P-256", "-nodes"]
    openssl("req", "-x509", *ec, "-keyout", "ca.key", "-out", "ca.pem", "-days", "2",
            "-subj", "/CN=openssl test CA", "-addext", "basicConstraints=critical,CA:TRUE",
            "-addext", "keyUsage=critical,keyCertSign,cRLSign", cwd=d)  # fmt: skip
    for name, kind in (("u", "agent"), ("v", "agent"), ("ops", "operator")):
        sans = f"URI:spiffe://resilient-mtl/{kind}/{name}" + (
            f",DNS:{name}.agent.resilient-mtl" if kind == "agent" else ""
        )
        (d / f"{name}.ext").write_text(f"subjectAltName={sans}\nextendedKeyUsage=serverAuth,clientAuth\n")
        openssl("req", *ec, "-keyout", f"{name}.key", "-out", f"{name}.csr", "-subj", f"/CN={name}", cwd=d)
        openssl("x509", "-req", "-in", f"{name}.csr", "-CA", "ca.pem", "-CAkey", "ca.key", "-CAcreateserial",
                "-out", f"{name}.pem", "-days", "1", "-extfile", f"{name}.ext", cwd=d)  # fmt: skip

    def cert_args(agent: str) -> list[str]:
        return [
            "--ca",
            str(d / "ca.pem"),
            "--cert",
            str(d / f"{agent}.pem"),
            "--key",
            str(d / f"{agent}.key"),
        ]

    operator = load_material(d / "ca.pem", d / "ops.pem", d / "ops.key", kind="operator")
    rounds = 3
    specs = [AgentSpec("u", ["v"]), AgentSpec("v", ["u"])]
    with DaemonSet(tmp_path / "run", specs, rounds, seed=4, cert_args=cert_args, operator=operator) as ds:
        ds.wait_done(timeout=180)
        for agent in ("u", "v"):
            rows = ds[agent].decisions()
            neighbour = [r for r in rows if r["neighbor"] != agent]
            assert len(neighbour) == rounds and all(r["decision"] != "missing" for r in neighbour), rows
        # The operator tool works with openssl-made material too.
        status = subprocess.run(
            [*mtl_node_command(), "status", ds["u"].address, *cert_args("ops")],
            capture_output=True, text=True, timeout=60,
        )  # fmt: skip
        assert status.returncode == 0, status.stderr
        assert '"agentId": "u"' in status.stdout


def run_serve(*args: str, timeout: float = 120) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [*mtl_node_command(), "serve", "--rounds", "1", "--rule", "none", *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        stdin=subprocess.DEVNULL,
    )


def test_a_second_daemon_on_a_port_in_use_exits_2_naming_the_port(tmp_path: Path, ca: TestCA) -> None:
    with DaemonSet(tmp_path, [AgentSpec("s")], 1, seed=1, rule="none") as ds:
        port = ds["s"].port
        for tls in (ca.args("t"), ["--insecure"]):
            done = run_serve("--id", "t", "--listen", f"127.0.0.1:{port}", *tls)
            assert done.returncode == 2, done.stderr
            assert f"127.0.0.1:{port}" in done.stderr and "Traceback" not in done.stderr, done.stderr


def test_without_usable_certificates_the_daemon_refuses_to_start(tmp_path: Path, ca: TestCA) -> None:
    """One line each, exit 2: no material (and how to make it), someone else's certificate,
    an expired one, a key that is not the certificate's."""
    now = dt.datetime.now(dt.UTC)
    expired_cert, expired_key = dated_cert(ca, "t", tmp_path, now - dt.timedelta(days=3), days=1)
    ca_path, t_cert, _ = ca.files("t")
    _, _, other_key = ca.files("u")
    cases = {
        "mtl-orchestrate certs": [],
        "names spiffe://resilient-mtl/agent/u": ca.args("u"),
        "expired on": ["--ca", str(ca_path), "--cert", str(expired_cert), "--key", str(expired_key)],
        "does not match the certificate": [
            "--ca",
            str(ca_path),
            "--cert",
            str(t_cert),
            "--key",
            str(other_key),
        ],
    }
    for expected, args in cases.items():
        done = run_serve("--id", "t", *args)
        assert done.returncode == 2, (expected, done.stderr)
        lines = done.stderr.strip().splitlines()
        assert len(lines) == 1 and expected in lines[0], (expected, done.stderr)
    assert run_serve("--id", "t", "--insecure", *ca.args("t")).returncode == 2


def test_insecure_is_an_explicit_opt_out_that_still_runs(tmp_path: Path) -> None:
    rounds = 2
    specs = [AgentSpec("p", ["q"]), AgentSpec("q", ["p"])]
    with DaemonSet(tmp_path, specs, rounds, seed=5, insecure=True) as ds:
        ds.wait_done(timeout=180)
        for d in ds:
            assert [int(r["round"]) for r in d.metrics()] == list(range(1, rounds + 1))
            assert d.stderr().count("--insecure: plaintext gRPC") == 1
        # A TLS client cannot talk to it, nor the plain status tool without --insecure.
        status = subprocess.run(
            [*mtl_node_command(), "status", ds["p"].address, "--insecure"],
            capture_output=True,
            text=True,
            timeout=60,
        )
        assert status.returncode == 0 and '"agentId": "p"' in status.stdout, status.stderr
        status = subprocess.run(
            [*mtl_node_command(), "status", ds["p"].address], capture_output=True, text=True, timeout=60
        )
        assert status.returncode == 2 and "mtl-orchestrate certs" in status.stderr, status.stderr


def test_operator_tools_with_certificates(tmp_path: Path, ca: TestCA) -> None:
    rounds = 2
    with DaemonSet(tmp_path, [AgentSpec("s")], rounds, seed=6, rule="none") as ds:
        ds.wait_done(timeout=120)
        ca_path, cert, key = ca.files("operator", "operator")
        tls = ["--ca", str(ca_path), "--cert", str(cert), "--key", str(key)]
        out = tmp_path / "model.safetensors"
        fetched = subprocess.run(
            [*mtl_node_command(), "fetch", ds["s"].address, "--out", str(out), "--agent", "s", *tls],
            capture_output=True, text=True, timeout=60,
        )  # fmt: skip
        assert fetched.returncode == 0, fetched.stderr
        assert out.stat().st_size > 0 and f"round {rounds}" in fetched.stdout
        # Expecting another agent at that address fails rather than talking to the wrong one.
        wrong = subprocess.run(
            [*mtl_node_command(), "status", ds["s"].address, "--agent", "z", *tls],
            capture_output=True, text=True, timeout=60,
        )  # fmt: skip
        assert wrong.returncode == 2 and "UNAVAILABLE" in wrong.stderr, wrong.stderr
