"""Secrets as QEMU loads them, compared with qemu-storage-daemon: encrypted with another secret
(`keyid`, `iv`: AES-256-CBC, how libvirt passes QEMU every password), and read from the
kernel's keyrings (`secret_keyring`). Each secret is put to use as the password of a LUKS
image, which opens only with the right bytes."""
import base64
import ctypes
import os
import subprocess

import pytest

from conftest import FERRITE, QSD, replies

# A fixed AES-256 key and IV, and two passwords encrypted with them (PKCS #7 padding, by
# `openssl enc -aes-256-cbc`): "hunter2" (9 bytes of padding) and a whole block
# (a block of padding).
MASTER = bytes(range(32))
IV = base64.b64encode(bytes(range(16, 32))).decode()
HUNTER2 = "whF1OoriMb97/+dxNMQjSg=="
WHOLE_BLOCK = "h5rblLmeNfb22WgFSLtx0aUJ37jB1JwhvYKMuqhjZes="
ZERO_BLOCK = base64.b64encode(bytes(16)).decode()


def luks_image(path, password):
    subprocess.run(["qemu-img", "create", "-q", "-f", "luks", "--object",
                    f"secret,id=s,data={password}", "-o", "key-secret=s,iter-time=10",
                    str(path), "1M"], check=True)
    return str(path)


def opens(image, secret):
    return ("blockdev-add", {"driver": "luks", "node-name": f"n-{secret}", "key-secret": secret,
                             "file": {"driver": "file", "filename": image}})


def encrypted(id, **props):
    return ("object-add", {"qom-type": "secret", "id": id, "keyid": "master", **props})


def test_encrypted_secrets_open_images_as_qsd(both, tmp_path):
    (tmp_path / "master.key").write_bytes(MASTER)
    short = luks_image(tmp_path / "short.luks", "hunter2")
    block = luks_image(tmp_path / "block.luks", "0123456789abcdef")
    b64 = {"format": "base64"}
    seq = [
        ("object-add", {"qom-type": "secret", "id": "master", "file": str(tmp_path / "master.key")}),
        encrypted("e1", data=HUNTER2, iv=IV, **b64),
        encrypted("e2", data=WHOLE_BLOCK, iv=IV, **b64),
        # The same bytes without base64: the ciphertext is the text itself.
        encrypted("raw", data=HUNTER2, iv=IV),
        encrypted("noiv", data=HUNTER2, **b64),
        encrypted("shortiv", data=HUNTER2, iv="AAAA", **b64),
        encrypted("badiv", data=HUNTER2, iv="!!!", **b64),
        encrypted("partial", data="AAAA", iv=IV, **b64),
        encrypted("bad64", data="!!!!", iv=IV, **b64),
        encrypted("padding", data=ZERO_BLOCK, iv=IV, **b64),
        encrypted("master", data=HUNTER2, iv=IV, **b64),
        ("object-add", {"qom-type": "secret", "id": "self", "data": HUNTER2, "keyid": "self",
                        "iv": IV, **b64}),
        ("object-add", {"qom-type": "secret", "id": "nokey", "data": HUNTER2, "keyid": "nope",
                        "iv": IV, **b64}),
        # A key of another length than AES-256's.
        ("object-add", {"qom-type": "secret", "id": "k16", "data": IV, **b64}),
        ("object-add", {"qom-type": "secret", "id": "shortkey", "data": HUNTER2, "keyid": "k16",
                        "iv": IV, **b64}),
        ("object-add", {"qom-type": "secret", "id": "notsecret", "data": HUNTER2, "keyid": "tg",
                        "iv": IV, **b64}),
        # An IV without a key is left alone.
        ("object-add", {"qom-type": "secret", "id": "ivonly", "data": "hunter2", "iv": IV}),
        # QEMU's base64: line breaks skipped, a short last group ignored.
        ("object-add", {"qom-type": "secret", "id": "lenient", "data": "aHVu\ndGVyMg==YQ",
                        **b64}),
        ("object-add", {"qom-type": "secret", "id": "type", "data": "x"}),
        opens(short, "lenient"),
        opens(short, "e1"),
        opens(block, "e2"),
        opens(short, "ivonly"),
        ("qom-get", {"path": "/objects/e1", "property": "keyid"}),
        ("qom-get", {"path": "/objects/e1", "property": "iv"}),
        ("qom-get", {"path": "/objects/e1", "property": "data"}),
        # Properties change after creation; the loaded value does not.
        ("qom-set", {"path": "/objects/e1", "property": "data", "value": "zzz"}),
        ("qom-set", {"path": "/objects/e1", "property": "iv", "value": "x"}),
        ("qom-set", {"path": "/objects/e1", "property": "format", "value": "raw"}),
        ("qom-set", {"path": "/objects/e1", "property": "format", "value": "nope"}),
        ("qom-set", {"path": "/objects/e1", "property": "data", "value": 5}),
        ("qom-get", {"path": "/objects/e1", "property": "data"}),
        ("qom-get", {"path": "/objects/e1", "property": "format"}),
        ("blockdev-del", {"node-name": "n-e1"}),
        opens(short, "e1"),
        ("object-del", {"id": "master"}),
        opens(block, "e2"),
        # A password naming no object, or an object that is not a secret.
        opens(short, "nope"),
        opens(short, "tg"),
    ]
    extra = ["--object", "throttle-group,id=tg"]
    qsd, ferrite = both(extra)
    assert replies(ferrite, seq) == replies(qsd, seq)


def test_an_empty_encrypted_secret_is_refused(ferrite, tmp_path):
    # qemu-storage-daemon reads the padding byte before the start of its buffer here and
    # goes on with whatever it finds.
    (tmp_path / "master.key").write_bytes(MASTER)
    c = ferrite().connect()
    c.cmd("object-add", {"qom-type": "secret", "id": "master",
                         "file": str(tmp_path / "master.key")})
    r = c.cmd(*encrypted("empty", data="", iv=IV, format="base64"))
    assert r["error"]["desc"] == "Encrypted secret data is empty: there is not even its padding"


# The keyrings, through the raw system calls (keyutils may not be installed).
SYS_ADD_KEY, SYS_KEYCTL = 248, 250
KEYCTL_SETPERM, KEY_SPEC_USER_KEYRING = 5, -4
# The possessor and the owner may do anything: a daemon started by the test does not possess
# keys of the test's keyrings, but has its user.
ALL_TO_OWNER = 0x3f3f0000


def add_key(description, payload):
    libc = ctypes.CDLL(None, use_errno=True)
    serial = libc.syscall(SYS_ADD_KEY, b"user", description.encode(), payload, len(payload),
                          ctypes.c_int(KEY_SPEC_USER_KEYRING))
    if serial < 0:
        pytest.skip(f"no kernel keyrings here: add_key: {os.strerror(ctypes.get_errno())}")
    if libc.syscall(SYS_KEYCTL, KEYCTL_SETPERM, serial, ctypes.c_uint(ALL_TO_OWNER)) != 0:
        pytest.skip(f"no kernel keyrings here: keyctl: {os.strerror(ctypes.get_errno())}")
    return serial


def test_keyring_secrets_as_qsd(both, tmp_path):
    image = luks_image(tmp_path / "k.luks", "hunter2")
    plain = add_key("ferrite-test-plain", b"hunter2")
    in_base64 = add_key("ferrite-test-base64", base64.b64encode(b"hunter2"))
    master = add_key("ferrite-test-master", MASTER)
    cipher = add_key("ferrite-test-cipher", base64.b64decode(HUNTER2))

    def keyring(id, **props):
        return ("object-add", {"qom-type": "secret_keyring", "id": id, **props})

    seq = [
        keyring("plain", serial=plain),
        keyring("b64", serial=in_base64, format="base64"),
        keyring("master", serial=master),
        keyring("cipher", serial=cipher, keyid="master", iv=IV),
        # A key no keyring holds (1 is never a key's serial), 0, none, out of range.
        keyring("missing", serial=1),
        keyring("neg", serial=-12345),
        keyring("zero", serial=0),
        keyring("none"),
        keyring("big", serial=1 << 31),
        keyring("data", serial=plain, data="x"),
        opens(image, "plain"),
        opens(image, "b64"),
        opens(image, "cipher"),
        ("qom-list", {"path": "/objects/plain"}),
        ("qom-list-properties", {"typename": "secret_keyring"}),
        ("qom-list-properties", {"typename": "secret"}),
        ("qom-list-types", {"implements": "secret_common"}),
        ("qom-get", {"path": "/objects/plain", "property": "serial"}),
        ("qom-get", {"path": "/objects/plain", "property": "keyid"}),
        ("qom-get", {"path": "/objects/plain", "property": "data"}),
        # A refused 0 is kept all the same, as in QEMU.
        ("qom-set", {"path": "/objects/plain", "property": "serial", "value": 0}),
        ("qom-get", {"path": "/objects/plain", "property": "serial"}),
        ("qom-set", {"path": "/objects/plain", "property": "serial", "value": 77}),
        ("qom-get", {"path": "/objects/plain", "property": "serial"}),
        ("blockdev-del", {"node-name": "n-plain"}),
        opens(image, "plain"),
    ]
    qsd, ferrite = both()
    assert replies(ferrite, seq) == replies(qsd, seq)
    # On the command line, the image opened by --blockdev.
    extra = ["--object", f"secret_keyring,id=k,serial={plain}",
             "--blockdev", f"luks,node-name=l,key-secret=k,file.driver=file,"
                           f"file.filename={image}"]
    for d in both(extra):
        nodes = d.connect().cmd("query-named-block-nodes")["return"]
        assert "l" in {n["node-name"] for n in nodes}, d.binary


def test_a_keyring_serial_of_the_wrong_type_is_refused(ferrite):
    # qemu-storage-daemon aborts here (an error set twice, in util/error.c).
    serial = add_key("ferrite-test-plain", b"hunter2")
    d = ferrite(["--object", f"secret_keyring,id=k,serial={serial}"])
    c = d.connect()
    for value, desc in (("x", "Invalid parameter type for 'serial', expected: integer"),
                        (1 << 32, "Parameter 'serial' expects int32_t")):
        r = c.cmd("qom-set", {"path": "/objects/k", "property": "serial", "value": value})
        assert r["error"]["desc"] == desc
    assert c.cmd("qom-get", {"path": "/objects/k", "property": "serial"})["return"] == serial


@pytest.mark.parametrize("options, message", [
    ("secret_keyring,id=k", "Parameter 'serial' is missing"),
    ("secret_keyring,id=k,serial=1", "Unable to read serial key 00000001: "
                                     "Required key not available"),
    ("secret_keyring,id=k,serial=0", "'serial' should not be equal to 0"),
])
def test_keyring_command_line_errors_as_qsd(options, message):
    for binary in (QSD, FERRITE):
        r = subprocess.run([binary, "--object", options], capture_output=True, text=True,
                           timeout=10)
        assert r.returncode == 1
        assert r.stderr.strip().endswith(f"--object {options}: {message}"), r.stderr
