"""The listener's TLS: an `ssl.SSLContext` built from `[listener] tls`.

Protocol:
    TLS 1.2 or later (`min_version = "1.3"` for 1.3 only), the `ssl` module's default cipher
    choice for servers (forward-secret AEAD suites; no compression, no renegotiation), ALPN
    `http/1.1`. No client certificates are asked for: senders prove themselves with
    `[sources.NAME.verify]`.

Keys:
    The private key is a secret reference (`file:`, `credential:`, `env:`). It is handed to
    OpenSSL through an anonymous in-memory file (`memfd_create`), so a key that came from the
    environment or a credential never touches a disk, and is never logged or put in an error.

Reload:
    `ferry ctl reload` (and SIGHUP) load the config again, which reads the key again, and build a
    new context from the certificate file and the key; new connections use it, open ones keep
    theirs. A certificate or key that cannot be used refuses the whole reload and the listener
    keeps serving the previous one.
"""

from __future__ import annotations

import os
import ssl

from actors.webhook.config import ListenerTlsConfig
from daemon.errors import ConfigError

_VERSIONS = {"1.2": ssl.TLSVersion.TLSv1_2, "1.3": ssl.TLSVersion.TLSv1_3}


def server_context(tls: ListenerTlsConfig | None, where: str = "$.listener.tls") -> ssl.SSLContext | None:
    """The context serving `tls` (None for plain HTTP); `ConfigError` naming the file, never the key."""
    if tls is None:
        return None
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.minimum_version = _VERSIONS[tls.min_version]
    context.options |= ssl.OP_NO_COMPRESSION | ssl.OP_NO_RENEGOTIATION
    context.set_alpn_protocols(["http/1.1"])
    fd = os.memfd_create("ferry-listener-key", os.MFD_CLOEXEC)
    try:
        os.write(fd, tls.key.value.reveal_bytes())
        context.load_cert_chain(tls.cert, keyfile=f"/proc/self/fd/{fd}")
    except FileNotFoundError:
        raise ConfigError([f"{where}.cert: cannot read {tls.cert}: no such file"]) from None
    except (OSError, ssl.SSLError) as exc:
        reason = (exc.reason if isinstance(exc, ssl.SSLError) else exc.strerror) or type(exc).__name__
        message = f"{where}: cannot use certificate {tls.cert} with key {tls.key.text}: {reason}"
        raise ConfigError([message]) from None
    finally:
        os.close(fd)
    return context
