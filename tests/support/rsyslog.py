"""A real rsyslogd for the tests: unprivileged, on loopback, with its own configuration.

imtcp on 127.0.0.1 (port 0 the first time, the port it got on each later start), or
imrelp (RELP, on a free port chosen the first time: imrelp cannot tell the port it
got), every message written to one file with ``%rawmsg%`` (the RFC 5424 message as
sent), its own work directory and pid file, no system configuration. A missing
rsyslogd or imrelp is an error, never a skip.
"""

from __future__ import annotations

import contextlib
import shutil
import signal
import socket
import subprocess
from pathlib import Path

from signerd.forwarding import Syslog, parse
from signerd.testing import wait_until

_CONF = """\
global(workDirectory="{dir}" maxMessageSize="64k"{tls_global})
module(load="imtcp"{tls_module})
template(name="raw" type="string" string="%rawmsg%\\n")
input(type="imtcp" address="127.0.0.1" port="{port}" listenPortFileName="{dir}/port"
      ruleset="collect")
ruleset(name="collect") {{
  action(type="omfile" file="{out}" template="raw")
}}
"""


_RELP_CONF = """\
global(workDirectory="{dir}" maxMessageSize="64k")
module(load="imrelp")
template(name="raw" type="string" string="%rawmsg%\\n")
input(type="imrelp" address="127.0.0.1" port="{port}" maxDataSize="64k" ruleset="collect"{tls})
ruleset(name="collect") {{
  action(type="omfile" file="{out}" template="raw")
}}
"""


def _imrelp() -> bool:
    """Whether rsyslog's imrelp module is installed (Debian: rsyslog-relp)."""
    return any(Path("/usr/lib").glob("*/rsyslog/imrelp.so"))


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


class Rsyslog:
    """One collector in ``directory``; ``start``/``stop`` as often as a test needs."""

    def __init__(
        self,
        directory: Path,
        tls: tuple[Path, Path] | None = None,
        *,
        relp: bool = False,
        peer: tuple[Path, str] | None = None,
    ) -> None:
        """``tls``: (certificate, key) files: TLS (rsyslog's ossl driver, or imrelp's)
        instead of TCP. ``relp``: imrelp instead of imtcp. ``peer`` (CA file, name): with
        ``tls``, only senders whose certificate that CA issued for that name are taken
        (without it, imtcp asks for none, and imrelp takes any its own CA issued)."""
        if relp and not _imrelp():
            raise RuntimeError("rsyslog's imrelp is not installed (apt-get install rsyslog-relp)")
        self.relp = relp
        self.peer = peer
        binary = shutil.which("rsyslogd") or (
            "/usr/sbin/rsyslogd" if Path("/usr/sbin/rsyslogd").exists() else None
        )
        if binary is None:
            raise RuntimeError("rsyslogd is not installed (apt-get install rsyslog)")
        self.binary = binary
        self.dir = directory
        self.dir.mkdir(parents=True, exist_ok=True)
        self.out = self.dir / "collected.log"
        self.port = 0
        self.proc: subprocess.Popen[bytes] | None = None
        self.tls = tls

    def start(self, timeout: float = 20.0) -> None:
        port_file = self.dir / "port"
        port_file.unlink(missing_ok=True)
        conf = self.dir / "rsyslog.conf"
        if self.relp:
            self._write_relp(conf)
        else:
            self._write_tcp(conf)
        with open(self.dir / "rsyslogd.log", "ab") as log:
            self.proc = subprocess.Popen(
                [self.binary, "-n", "-f", str(conf), "-i", str(self.dir / "rsyslogd.pid")],
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
        if self.port == 0:  # rsyslogd writes the port it got only when it chose it
            wait_until(
                lambda: port_file.exists() and port_file.read_text().strip().isdigit(),
                timeout=timeout,
                what="rsyslogd to listen (see rsyslogd.log)",
            )
            self.port = int(port_file.read_text().strip())
        else:
            port = self.port
            wait_until(lambda: _listening(port), timeout=timeout, what="rsyslogd to listen")

    def _write_relp(self, conf: Path) -> None:
        if self.port == 0:
            self.port = _free_port()
        tls = ""
        if self.tls is not None:
            cert, key = self.tls
            tls = f' tls="on" tls.myCert="{cert}" tls.myPrivKey="{key}"'
            if self.peer is None:
                tls += f' tls.caCert="{cert}" tls.authMode="certvalid"'
            else:
                ca, name = self.peer
                tls += f' tls.caCert="{ca}" tls.authMode="name" tls.permittedPeer=["{name}"]'

        conf.write_text(_RELP_CONF.format(dir=self.dir, port=self.port, out=self.out, tls=tls))

    def _write_tcp(self, conf: Path) -> None:
        tls_global = tls_module = ""
        if self.tls is not None:
            cert, key = self.tls
            ca, auth = cert, 'streamDriver.authMode="anon"'
            if self.peer is not None:  # the senders' CA beside our own certificate
                ca = self.dir / "ca.pem"
                ca.write_bytes(cert.read_bytes() + self.peer[0].read_bytes())
                auth = f'streamDriver.authMode="x509/name" permittedPeer=["{self.peer[1]}"]'
            tls_global = (
                f' defaultNetstreamDriver="ossl" defaultNetstreamDriverCAFile="{ca}"'
                f' defaultNetstreamDriverCertFile="{cert}" defaultNetstreamDriverKeyFile="{key}"'
            )
            tls_module = f' streamDriver.name="ossl" streamDriver.mode="1" {auth}'
        conf.write_text(
            _CONF.format(
                dir=self.dir,
                port=self.port,
                out=self.out,
                tls_global=tls_global,
                tls_module=tls_module,
            )
        )

    def stop(self, timeout: float = 15.0) -> None:
        proc, self.proc = self.proc, None
        if proc is None or proc.poll() is not None:
            return
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(5)

    def log_text(self) -> str:
        with contextlib.suppress(OSError):
            return (self.dir / "rsyslogd.log").read_text(errors="replace")
        return ""

    def messages(self) -> list[Syslog]:
        """What the collector wrote so far, one message a line (unparseable lines fail); a
        last line rsyslog is still writing (no newline yet) is not read."""
        if not self.out.exists():
            return []
        out = []
        written = self.out.read_bytes()
        for line in written[: written.rfind(b"\n") + 1].splitlines():
            parsed = parse(line)
            assert parsed is not None, line[:200]
            out.append(parsed)
        return out

    def __enter__(self) -> Rsyslog:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()


def _listening(port: int) -> bool:
    """Whether something listens on 127.0.0.1:``port`` (from /proc/net/tcp, no connection)."""
    want = f"0100007F:{port:04X}"
    lines = Path("/proc/net/tcp").read_text().splitlines()[1:]
    return any(f[1] == want and f[3] == "0A" for f in (line.split() for line in lines))


def wait_for(collector: Rsyslog, count: int, msgid: str = "audit", timeout: float = 60.0) -> None:
    """Until the collector holds at least ``count`` messages of ``msgid``."""
    wait_until(
        lambda: sum(m.msgid == msgid for m in collector.messages()) >= count,
        timeout=timeout,
        what=f"{count} {msgid} messages at the collector",
    )
