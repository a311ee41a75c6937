"""mTLS material with `cryptography`: a CA, a server certificate and a client certificate."""

from __future__ import annotations

import datetime as dt
import ipaddress
from dataclasses import dataclass

from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID


@dataclass(frozen=True)
class KeyPair:
    key_pem: bytes
    cert_pem: bytes

    @property
    def cert(self) -> x509.Certificate:
        return x509.load_pem_x509_certificate(self.cert_pem)

    @property
    def not_after(self) -> dt.datetime:
        return self.cert.not_valid_after_utc


def _now() -> dt.datetime:
    return dt.datetime.now(dt.UTC)


def _key() -> ec.EllipticCurvePrivateKey:
    return ec.generate_private_key(ec.SECP256R1())


def _pem(key: ec.EllipticCurvePrivateKey) -> bytes:
    return key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                             serialization.NoEncryption())


def _name(cn: str) -> x509.Name:
    return x509.Name([x509.NameAttribute(NameOID.ORGANIZATION_NAME, "llamafleet"),
                      x509.NameAttribute(NameOID.COMMON_NAME, cn[:64])])


def new_ca(common_name: str, validity: dt.timedelta) -> KeyPair:
    key = _key()
    now = _now()
    cert = (
        x509.CertificateBuilder()
        .subject_name(_name(common_name)).issuer_name(_name(common_name))
        .public_key(key.public_key()).serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(minutes=5)).not_valid_after(now + validity)
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(x509.KeyUsage(digital_signature=True, key_cert_sign=True, crl_sign=True,
                                     content_commitment=False, key_encipherment=False,
                                     data_encipherment=False, key_agreement=False,
                                     encipher_only=False, decipher_only=False), critical=True)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
        .sign(key, hashes.SHA256())
    )
    return KeyPair(_pem(key), cert.public_bytes(serialization.Encoding.PEM))


def issue(ca: KeyPair, common_name: str, validity: dt.timedelta, *, sans: list[str] = (),
          client: bool = False) -> KeyPair:
    """A leaf certificate signed by ``ca``: server (SANs) or client (clientAuth)."""
    ca_key = serialization.load_pem_private_key(ca.key_pem, None)
    ca_cert = ca.cert
    key = _key()
    now = _now()
    builder = (
        x509.CertificateBuilder()
        .subject_name(_name(common_name)).issuer_name(ca_cert.subject)
        .public_key(key.public_key()).serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(minutes=5))
        .not_valid_after(min(now + validity, ca_cert.not_valid_after_utc))
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(x509.ExtendedKeyUsage(
            [ExtendedKeyUsageOID.CLIENT_AUTH if client else ExtendedKeyUsageOID.SERVER_AUTH]),
            critical=False)
        .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_cert.public_key()),
                       critical=False)
    )
    names: list[x509.GeneralName] = []
    for san in sans or ([] if client else [common_name]):
        try:
            names.append(x509.IPAddress(ipaddress.ip_address(san)))
        except ValueError:
            names.append(x509.DNSName(san))
    if names:
        builder = builder.add_extension(x509.SubjectAlternativeName(names), critical=False)
    cert = builder.sign(ca_key, hashes.SHA256())  # type: ignore[arg-type]
    return KeyPair(_pem(key), cert.public_bytes(serialization.Encoding.PEM))


def subject_names(leaf: KeyPair) -> set[str]:
    """The DNS names and IP addresses a certificate is valid for (its SANs)."""
    try:
        san = leaf.cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    except x509.ExtensionNotFound:
        return set()
    return {str(v) for v in san.get_values_for_type(x509.DNSName)} | {
        str(v) for v in san.get_values_for_type(x509.IPAddress)}


def signed_by(leaf: KeyPair, ca: KeyPair) -> bool:
    """Whether ``ca`` issued ``leaf`` (issuer name and signature both checked)."""
    try:
        leaf.cert.verify_directly_issued_by(ca.cert)
    except (ValueError, TypeError, InvalidSignature):
        return False
    return True


@dataclass(frozen=True)
class CAState:
    """A CA and what clients are told to trust, through a rotation with overlap.

    phase "": ``bundle`` is the signer alone. "overlap": a new CA (``next``) is published
    beside the signer in ``bundle``; leaves are still signed by the old one. "reissued":
    ``signer`` is the new CA and leaves are reissued; the old CA stays in ``bundle`` until
    the mounts everywhere hold the new leaves. Then the bundle drops it (phase "").
    """

    signer: KeyPair
    bundle: bytes
    next: KeyPair | None = None
    phase: str = ""
    since: dt.datetime | None = None


def ca_step(state: CAState | None, *, renew_before: dt.timedelta, overlap: dt.timedelta,
            now: dt.datetime) -> str:
    """What the CA's life needs at ``now``: "" nothing, "new" (none yet, or expired: too
    late to overlap), "rotate" (publish a new CA beside the old), "switch" (sign with the
    new one) or "drop" (the old CA leaves the bundle).

    Each step waits ``overlap`` after the previous one, so that servers and clients whose
    mounted Secrets refresh at different times always trust each other's certificates.
    """
    if state is None or now >= state.signer.not_after:
        return "new"
    waited = state.since is not None and now - state.since >= overlap
    if state.phase == "overlap" and state.next is not None and waited:
        return "switch"
    if state.phase == "reissued" and waited:
        return "drop"
    if not state.phase and needs_renewal(state.signer, renew_before, now):
        return "rotate"
    return ""


@dataclass(frozen=True)
class Renewal:
    """What is due now: the CA's step (see :func:`ca_step`) and the leaves to (re)issue."""

    ca: str
    leaves: tuple[str, ...]


def renewal_due(ca: CAState | None, leaves: dict[str, KeyPair | None], *,
                renew_before: dt.timedelta, overlap: dt.timedelta,
                now: dt.datetime) -> Renewal:
    """Decide, without issuing anything, what :func:`advance_ca` and :func:`issue` must do.

    A leaf (by name) is due when it is missing, not signed by the CA that signs after this
    step, or within ``renew_before`` of its expiry; while a new CA is only published
    (overlap), a leaf that is merely close to expiry waits for the switch.
    """
    step = ca_step(ca, renew_before=renew_before, overlap=overlap, now=now)
    if step == "new" or ca is None:
        return Renewal("new", tuple(leaves))
    signer = ca.next if step == "switch" and ca.next is not None else ca.signer
    overlapping = step == "rotate" or (ca.phase == "overlap" and step != "switch")
    due = tuple(name for name, leaf in leaves.items()
                if leaf is None or not signed_by(leaf, signer)
                or (not overlapping and needs_renewal(leaf, renew_before, now)))
    return Renewal(step, due)


def advance_ca(state: CAState | None, common_name: str, *, validity: dt.timedelta,
               renew_before: dt.timedelta, overlap: dt.timedelta,
               now: dt.datetime | None = None) -> CAState:
    """One step of the CA's life (:func:`ca_step`): create, start a rotation, switch
    signer, drop the old CA; ``state`` itself when nothing is due."""
    now = now or _now()
    step = ca_step(state, renew_before=renew_before, overlap=overlap, now=now)
    if step == "new" or state is None:
        ca = new_ca(common_name, validity * 2)  # the CA outlives its leaves: twice the validity
        return CAState(ca, ca.cert_pem)
    if step == "switch" and state.next is not None:
        return CAState(state.next, state.bundle, None, "reissued", now)
    if step == "drop":
        return CAState(state.signer, state.signer.cert_pem)
    if step == "rotate":
        new = new_ca(common_name, validity * 2)
        return CAState(state.signer, state.signer.cert_pem + new.cert_pem, new, "overlap", now)
    return state


def needs_renewal(pair: KeyPair, renew_before: dt.timedelta, now: dt.datetime | None = None) -> bool:
    return (now or _now()) >= pair.not_after - renew_before


def parse_duration(text: str, allow_zero: bool = False) -> dt.timedelta:
    """Go-style durations as Kubernetes users write them: 8760h, 30m, 90s, 1h30m, 7d
    (``0s`` only with ``allow_zero``)."""
    units = {"d": 86400, "h": 3600, "m": 60, "s": 1}
    total, num = 0.0, ""
    for ch in text.strip():
        if ch.isdigit() or ch == ".":
            num += ch
        elif ch in units and num:
            total += float(num) * units[ch]
            num = ""
        else:
            raise ValueError(f"invalid duration {text!r}: use e.g. 8760h, 30m, 90s")
    if num or total < 0 or (total == 0 and not (allow_zero and text.strip())):
        raise ValueError(f"invalid duration {text!r}: use e.g. 8760h, 30m, 90s")
    return dt.timedelta(seconds=total)
