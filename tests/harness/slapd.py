"""A throwaway OpenLDAP server (Debian ``slapd``) on 127.0.0.1, with its own cn=config and data.

It never touches a system slapd: the configuration (``slapd.d``), the mdb database, the pid
file and the log all live under ``workdir``, and it listens on free loopback ports only.
"""

from __future__ import annotations

import base64
import hashlib
import os
import secrets
import shutil
import subprocess
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType
from typing import Self

import ldap3

from .net import free_port
from .process import ManagedProcess
from .tools import require_tool, run, start_process, tail

__all__ = ["AD_LITE_SCHEMA", "Slapd", "SlapdTls", "ssha"]

# Active Directory's account attributes and classes, with AD's own OIDs, so a test can search the
# way an AD configuration does (``sAMAccountName``, ``objectClass=user``, not ``computer``). The
# rest of AD (UPN binds, objectCategory, nested-group matching rules) cannot be had in slapd.
AD_LITE_SCHEMA = """\
dn: cn=adlite,cn=schema,cn=config
objectClass: olcSchemaConfig
cn: adlite
olcAttributeTypes: ( 1.2.840.113556.1.4.221 NAME 'sAMAccountName'
  EQUALITY caseIgnoreMatch SUBSTR caseIgnoreSubstringsMatch
  SYNTAX 1.3.6.1.4.1.1466.115.121.1.15 SINGLE-VALUE )
olcAttributeTypes: ( 1.2.840.113556.1.4.656 NAME 'userPrincipalName'
  EQUALITY caseIgnoreMatch SYNTAX 1.3.6.1.4.1.1466.115.121.1.15 SINGLE-VALUE )
olcObjectClasses: ( 1.2.840.113556.1.5.9 NAME 'user' AUXILIARY
  MAY ( sAMAccountName $ userPrincipalName ) )
olcObjectClasses: ( 1.2.840.113556.1.3.30 NAME 'computer' SUP user AUXILIARY )
"""


def ssha(password: str) -> str:
    """An RFC 2307 ``{SSHA}`` userPassword value, as ``slappasswd`` makes."""
    salt = secrets.token_bytes(8)
    digest = hashlib.sha1(password.encode() + salt).digest()
    return "{SSHA}" + base64.b64encode(digest + salt).decode("ascii")


@dataclass(frozen=True)
class SlapdTls:
    """PEM files for slapd's TLS: the server's certificate chain and key (and the CA that signed it)."""

    cert_file: Path
    key_file: Path
    ca_file: Path


class Slapd(ManagedProcess):
    """``slapd -F WORKDIR/slapd.d`` with an mdb database for ``dc=example,dc=org``.

    The configuration loads core, cosine, nis, inetorgperson and ``AD_LITE_SCHEMA``, the
    ``memberof`` overlay (``groupOfNames`` members get ``memberOf``, kept in step by refint), and
    ACLs under which anyone may bind and read everything but ``userPassword``. The root DN
    ``ADMIN_DN``/``admin_password`` loads data with ``add_ldif`` (``ldapadd`` over LDAP, so the
    overlay sees the writes).

    Args:
        workdir: where everything lives; a temporary directory (removed on ``close``) if None.
        tls: serve StartTLS on ``url`` and LDAPS on ``ldaps_url`` with these files.
        allow_unauthenticated_bind: accept a simple bind with a DN and an empty password as an
            anonymous one (``olcAllows: bind_anon_dn``), as Active Directory does.
        startup_timeout: seconds to wait for the server to answer.

    After ``start``: ``url`` (``ldap://127.0.0.1:PORT``), ``ldaps_url`` (with ``tls``),
    ``log_path`` (``-d stats``: one line per connection and operation), ``proc``. ``stop`` keeps the
    data, so ``start`` again brings the same directory back on the same ports.
    """

    name = "slapd"
    SUFFIX = "dc=example,dc=org"
    ADMIN_DN = "cn=admin,dc=example,dc=org"

    def __init__(
        self,
        workdir: str | Path | None = None,
        *,
        tls: SlapdTls | None = None,
        allow_unauthenticated_bind: bool = False,
        startup_timeout: float = 10.0,
    ) -> None:
        self._own_dir = workdir is None
        self.workdir = Path(workdir) if workdir is not None else Path(tempfile.mkdtemp(prefix="slapd-"))
        self.tls = tls
        self.allow_unauthenticated_bind = allow_unauthenticated_bind
        self.startup_timeout = startup_timeout
        self.admin_password = secrets.token_urlsafe(12)
        self.config_dir = self.workdir / "slapd.d"
        self.data_dir = self.workdir / "data"
        self.log_path = self.workdir / "slapd.log"
        self.port = 0
        self.ldaps_port = 0
        self.proc: subprocess.Popen[bytes] | None = None
        self._binary = ""

    @property
    def url(self) -> str:
        return f"ldap://127.0.0.1:{self.port}"

    @property
    def ldaps_url(self) -> str:
        if self.tls is None:
            raise RuntimeError("slapd was started without TLS")
        return f"ldaps://127.0.0.1:{self.ldaps_port}"

    def _config_ldif(self) -> str:
        tls = ""
        if self.tls is not None:
            tls = (
                f"olcTLSCACertificateFile: {self.tls.ca_file}\n"
                f"olcTLSCertificateFile: {self.tls.cert_file}\n"
                f"olcTLSCertificateKeyFile: {self.tls.key_file}\n"
            )
        allows = "olcAllows: bind_anon_dn\n" if self.allow_unauthenticated_bind else ""
        schema = "\n".join(
            f"include: file:///etc/ldap/schema/{name}.ldif" for name in ("core", "cosine", "nis", "inetorgperson")
        )
        return f"""\
dn: cn=config
objectClass: olcGlobal
cn: config
olcPidFile: {self.workdir / "slapd.pid"}
olcArgsFile: {self.workdir / "slapd.args"}
{tls}{allows}
dn: cn=module{{0}},cn=config
objectClass: olcModuleList
cn: module{{0}}
olcModulePath: /usr/lib/ldap
olcModuleLoad: back_mdb
olcModuleLoad: memberof

dn: cn=schema,cn=config
objectClass: olcSchemaConfig
cn: schema

{schema}

{AD_LITE_SCHEMA}
dn: olcDatabase={{-1}}frontend,cn=config
objectClass: olcDatabaseConfig
objectClass: olcFrontendConfig
olcDatabase: {{-1}}frontend

dn: olcDatabase={{0}}config,cn=config
objectClass: olcDatabaseConfig
olcDatabase: {{0}}config
olcAccess: {{0}}to * by * none

dn: olcDatabase={{1}}mdb,cn=config
objectClass: olcDatabaseConfig
objectClass: olcMdbConfig
olcDatabase: {{1}}mdb
olcSuffix: {self.SUFFIX}
olcRootDN: {self.ADMIN_DN}
olcRootPW: {ssha(self.admin_password)}
olcDbDirectory: {self.data_dir}
olcDbMaxSize: 67108864
olcAccess: {{0}}to attrs=userPassword by self write by anonymous auth by * none
olcAccess: {{1}}to * by * read

dn: olcOverlay={{0}}memberof,olcDatabase={{1}}mdb,cn=config
objectClass: olcOverlayConfig
objectClass: olcMemberOf
olcOverlay: {{0}}memberof
olcMemberOfRefInt: TRUE
olcMemberOfGroupOC: groupOfNames
olcMemberOfMemberAD: member
olcMemberOfMemberOfAD: memberOf
"""

    def _configure(self) -> None:
        """Writes cn=config with ``slapadd -n0`` (once: a restart keeps configuration and data)."""
        if self.config_dir.exists():
            return
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.data_dir.mkdir(exist_ok=True)
        staging = self.workdir / "slapd.d.new"
        shutil.rmtree(staging, ignore_errors=True)
        staging.mkdir()
        ldif = self.workdir / "config.ldif"
        ldif.write_text(self._config_ldif())
        run([require_tool("slapadd"), "-n0", "-F", staging, "-l", ldif], timeout=30)
        staging.rename(self.config_dir)
        base = f"dn: {self.SUFFIX}\nobjectClass: dcObject\nobjectClass: organization\no: Example\ndc: example\n"
        run([require_tool("slapadd"), "-n1", "-F", self.config_dir, "-q"], input=base.encode(), timeout=30)

    def _argv(self) -> list[str]:
        listeners = self.url + "/"
        if self.tls is not None:
            listeners += f" {self.ldaps_url}/"
        # -d stats: stay in the foreground and log connections and operations (tests count them).
        return [self._binary, "-h", listeners, "-F", str(self.config_dir), "-d", "stats"]

    def _launch(self) -> subprocess.Popen[bytes]:
        return start_process(self._argv(), log_path=self.log_path)

    def start(self) -> Self:
        """Configures (first time only), starts slapd and waits until it answers an anonymous bind."""
        if self.proc is not None:
            raise RuntimeError("slapd is already running")
        self._binary = require_tool("slapd")
        self._configure()
        last_error = "not started"
        for _ in range(self.start_attempts):
            if not self.port:
                self.port = free_port()
            if self.tls is not None and not self.ldaps_port:
                self.ldaps_port = free_port()
            log_offset = self.log_path.stat().st_size if self.log_path.exists() else 0
            self.proc = self._launch()
            try:
                self._wait_ready()
                return self
            except (TimeoutError, RuntimeError) as exc:
                last_error = str(exc)
                self._stop_proc()
                if "address already in use" not in self._log_since(log_offset).lower():
                    break
                self.port = self.ldaps_port = 0  # free_port() raced with another process: pick others
        raise RuntimeError(f"slapd did not start: {last_error}\n--- {self.log_path}:\n{tail(self.log_path)}")

    def _wait_ready(self) -> None:
        deadline = time.monotonic() + self.startup_timeout
        last = "no attempt made"
        while True:
            if not self.is_running():
                raise RuntimeError(f"slapd exited while starting (last: {last})")
            server = ldap3.Server(self.url, connect_timeout=1, get_info=ldap3.NONE)
            connection = ldap3.Connection(server, receive_timeout=1, raise_exceptions=False)
            try:
                if connection.bind():
                    return
                last = str(connection.result)
            except ldap3.core.exceptions.LDAPException as exc:
                last = f"{type(exc).__name__}: {exc}"
            finally:
                connection.unbind()
            if time.monotonic() >= deadline:
                raise TimeoutError(f"slapd at {self.url} not ready after {self.startup_timeout}s (last: {last})")
            time.sleep(0.05)

    def add_ldif(self, ldif: str) -> None:
        """Adds entries (LDIF text) as the root DN with ``ldapadd``, through the running server."""
        run(
            [require_tool("ldapadd"), "-x", "-H", self.url, "-D", self.ADMIN_DN, "-y", self._admin_password_file()],
            input=ldif.encode(),
            timeout=30,
        )

    def _admin_password_file(self) -> Path:
        # ldapadd -y reads the whole file as the password, so no trailing newline.
        path = self.workdir / "admin.password"
        if not path.exists():
            path.write_text(self.admin_password)
            os.chmod(path, 0o600)
        return path

    def connection_count(self) -> int:
        """Connections accepted so far (all runs), from the ``-d stats`` log."""
        return self.log_text().count(" ACCEPT from ")

    def close(self) -> None:
        """Stops the server and removes the temporary workdir, if this object made it."""
        self.stop()
        if self._own_dir:
            shutil.rmtree(self.workdir, ignore_errors=True)

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"Slapd(url={self.url!r}, workdir={str(self.workdir)!r})"
