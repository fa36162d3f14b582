"""Named keys from API_KEYS_FILE: the file's rules and its line-numbered errors, lookup, reloading, the command."""

from __future__ import annotations

import hashlib
import hmac
import logging
import re
import subprocess
import sys
from pathlib import Path

import pytest

from sd35 import keys as keys_module
from sd35.config import ConfigError, load_settings
from sd35.keys import KeyFileError, KeyRing, KeySource, default_keys, digest_of, parse_keys
from tests.conftest import ROOT

ALICE = "sk-alice-0123456789"
BOB = "sk-bob-abcdefghij"

GOOD = f"""\
# the team's keys
[keys.alice]
sha256 = "{hashlib.sha256(ALICE.encode()).hexdigest()}"
images_per_minute = 20
weight = 2.5

[keys.bob]
key = "{BOB}"
max_queue_images = 8
admin = true
"""


def write(path: Path, text: str) -> Path:
    path.write_text(text)
    return path


def test_both_forms_and_their_fields() -> None:
    alice, bob = parse_keys(GOOD)
    assert (alice.name, alice.images_per_minute, alice.weight, alice.max_queue_images, alice.admin) == (
        "alice",
        20,
        2.5,
        None,
        False,
    )
    assert (bob.name, bob.images_per_minute, bob.weight, bob.max_queue_images, bob.admin) == ("bob", 0, 1.0, 8, True)
    ring = KeyRing([alice, bob])
    assert ring.lookup(ALICE.encode()) is alice
    assert ring.lookup(BOB.encode()) is bob
    assert ring.lookup(b"sk-alice-012345678") is None
    assert "sk-" not in repr(alice), "the key (or its digest) never shows in a repr"


def test_an_empty_file_accepts_nobody() -> None:
    assert parse_keys("") == ()
    assert KeyRing(parse_keys("# nothing yet\n")).lookup(b"anything") is None


def test_lookup_compares_with_every_key_without_stopping_early(monkeypatch: pytest.MonkeyPatch) -> None:
    compared: list[bytes] = []
    real = hmac.compare_digest

    def counting(a: bytes, b: bytes) -> bool:
        compared.append(b)
        return real(a, b)

    monkeypatch.setattr(keys_module.hmac, "compare_digest", counting)
    ring = KeyRing([*default_keys(["k1"]), *parse_keys(GOOD)])
    assert ring.lookup(b"k1") is not None
    assert len(compared) == 3, "a match on the first key still compares the others"
    assert all(len(digest) == 32 for digest in compared), "digests, whatever the token's length"


SHA = "a" * 64


@pytest.mark.parametrize(
    ("text", "line", "words"),
    [
        ("[keys.alice]\nsha256 = 'abc", 2, "not valid TOML"),
        ("[keys.alice]\n\nsha256 = 'nothex'\n", 3, "64 hexadecimal characters"),
        (f"[keys.alice]\nsha256 = '{SHA}'\nimages_per_min = 3\n", 3, "unknown field 'images_per_min'"),
        ("[keys.alice]\nweight = 1\n", 1, "exactly one of sha256"),
        (f"[keys.alice]\nsha256 = '{SHA}'\nkey = 'k'\n", 1, "exactly one of sha256"),
        (f"[keys.a]\nkey = 'x'\n[keys.alice]\nsha256 = '{SHA}'\nweight = 0\n", 5, "weight must be a number above 0"),
        (f"[keys.alice]\nsha256 = '{SHA}'\nimages_per_minute = -1\n", 3, "images_per_minute must be a whole number"),
        (f"[keys.alice]\nsha256 = '{SHA}'\nimages_per_minute = 2.5\n", 3, "images_per_minute must be a whole number"),
        (f"[keys.alice]\nsha256 = '{SHA}'\nmax_queue_images = 0\n", 3, "max_queue_images"),
        (f"[keys.alice]\nsha256 = '{SHA}'\nadmin = 'yes'\n", 3, "admin must be true or false"),
        ("[keys.alice]\nkey = 'two words'\n", 2, "without spaces"),
        (f"[keys.alice]\nsha256 = '{SHA}'\n\n[keys.bob]\nsha256 = '{SHA.upper()}'\n", 4, "same key as keys.alice"),
        (f"[keys.default]\nsha256 = '{SHA}'\n", 1, "API_KEY's"),
        (f"[keys.'bad name']\nsha256 = '{SHA}'\n", 1, "key name 'bad name' is invalid"),
        ("[keys]\nalice = 3\n", 2, "keys.alice must be a table"),
        (f"[users.alice]\nsha256 = '{SHA}'\n", 1, "unknown entry 'users'"),
    ],
)
def test_every_problem_names_the_file_and_line(text: str, line: int, words: str) -> None:
    with pytest.raises(KeyFileError) as invalid:
        parse_keys(text, "/etc/sd35/keys.toml")
    message = str(invalid.value)
    assert message.startswith(f"API_KEYS_FILE /etc/sd35/keys.toml, line {line}: "), message
    assert words in message, message


def test_a_file_key_equal_to_an_api_key_is_refused(tmp_path: Path) -> None:
    path = write(tmp_path / "keys.toml", "[keys.alice]\nkey = 'shared'\n")
    with pytest.raises(KeyFileError, match="one of API_KEY's keys"):
        KeySource(["shared"], path)


def test_an_invalid_file_refuses_the_start(tmp_path: Path) -> None:
    path = write(tmp_path / "keys.toml", f"[keys.alice]\nsha256 = '{SHA}'\nweight = -2\n")
    with pytest.raises(ConfigError, match=re.escape(f"API_KEYS_FILE {path}, line 3: keys.alice.weight")):
        load_settings({"API_KEYS_FILE": str(path)})
    with pytest.raises(ConfigError, match=r"API_KEYS_FILE=.* is invalid: expected the path of an existing keys file"):
        load_settings({"API_KEYS_FILE": str(tmp_path / "missing.toml")})


def test_a_keys_file_turns_authentication_on_even_empty(tmp_path: Path) -> None:
    settings = load_settings({"API_KEYS_FILE": str(write(tmp_path / "keys.toml", ""))})
    assert settings.auth_enabled
    assert KeySource.from_settings(settings).enabled


@pytest.mark.parametrize(
    ("env", "error"),
    [
        ({"MAX_QUEUE_IMAGES": "8", "MAX_QUEUE_IMAGES_PER_KEY": "9"}, "expected at most MAX_QUEUE_IMAGES"),
        ({"MAX_QUEUE_IMAGES_PER_KEY": "0"}, "MAX_QUEUE_IMAGES_PER_KEY='0' is invalid"),
        ({"QUEUE_POLICY": "lottery"}, "QUEUE_POLICY='lottery' is invalid: expected fair or fifo"),
    ],
)
def test_queue_settings_are_validated(env: dict[str, str], error: str) -> None:
    with pytest.raises(ConfigError, match=error):
        load_settings(env)


def test_queue_limit_per_key(tmp_path: Path) -> None:
    assert KeySource(max_queue_images=64).queue_limit("-") == 64, "auth off: one flow, the whole queue"
    assert KeySource(["k"], max_queue_images=64).queue_limit("default") == 64, "API_KEY alone: one name"
    several = KeySource(["k"], write(tmp_path / "keys.toml", GOOD), max_queue_images=64)
    assert several.queue_limit("alice") == 32, "several names: half the queue each by default"
    assert several.queue_limit("bob") == 8, "the key's own max_queue_images"
    assert several.weight("alice") == 2.5 and several.weight("removed-since") == 1.0
    fixed = KeySource(["k"], tmp_path / "keys.toml", max_queue_images=64, max_queue_images_per_key=48)
    assert fixed.queue_limit("alice") == 48
    capped = KeySource(["k"], write(tmp_path / "big.toml", "[keys.big]\nkey='b'\nmax_queue_images=500\n"), 64)
    assert capped.queue_limit("big") == 64, "never more than the whole queue"


def test_reload_adds_removes_and_keeps_the_last_good_set(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    path = write(tmp_path / "keys.toml", "[keys.alice]\nkey = 'ka'\n")
    source = KeySource(path=path)
    assert source.ring.lookup(b"ka").name == "alice"

    write(path, "[keys.alice]\nkey = 'ka'\n\n[keys.carol]\nkey = 'kc'\nimages_per_minute = 5\n")
    with caplog.at_level(logging.INFO, logger="sd35.keys"):
        assert source.check()
    assert source.ring.lookup(b"kc").images_per_minute == 5
    assert "added: carol; removed: none" in caplog.text

    write(path, "[keys.carol]\nkey = 'kc'\n")
    assert source.check()
    assert source.ring.lookup(b"ka") is None, "a removed key is refused from then on"

    caplog.clear()
    write(path, "[keys.carol]\nkey = 'kc'\nweight = 'heavy'\n")
    with caplog.at_level(logging.INFO, logger="sd35.keys"):
        assert not source.check()
        assert not source.check(), "unchanged since: not read again"
    errors = [record for record in caplog.records if record.levelno == logging.ERROR]
    assert len(errors) == 1, "one error per broken version of the file"
    assert f"API_KEYS_FILE {path}, line 3: keys.carol.weight" in errors[0].getMessage()
    assert "the keys loaded before stay in force" in errors[0].getMessage()
    assert source.ring.lookup(b"kc") is not None

    path.unlink()
    assert not source.check()
    assert source.ring.lookup(b"kc") is not None, "a deleted file keeps the last good set too"

    write(path, "[keys.dave]\nkey = 'kd'\n")
    assert source.check()
    assert source.ring.lookup(b"kd").name == "dave" and source.ring.lookup(b"kc") is None


def test_the_watcher_applies_an_edit_within_seconds(tmp_path: Path) -> None:
    path = write(tmp_path / "keys.toml", "[keys.alice]\nkey = 'ka'\n")
    source = KeySource(path=path, interval=0.05)
    source.start()
    try:
        write(path, "[keys.bob]\nkey = 'kb'\n")
        for _ in range(200):
            if source.ring.lookup(b"kb") is not None:
                break
            source._stop.wait(0.05)
        assert source.ring.lookup(b"kb") is not None and source.ring.lookup(b"ka") is None
    finally:
        source.stop()


def run_keys(*args: str, stdin: str = "") -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "sd35.keys", *args], cwd=ROOT, input=stdin, capture_output=True, text=True, timeout=60
    )


def test_the_new_command_prints_a_key_and_its_entry(tmp_path: Path) -> None:
    result = run_keys("new", "alice", "--images-per-minute", "30")
    assert result.returncode == 0, result.stderr
    key = next(word for word in result.stdout.split() if word.startswith("sk-sd35-"))
    assert len(key) > 40
    entry = result.stdout[result.stdout.index("[keys.alice]") :]
    (parsed,) = parse_keys(entry)
    assert parsed.digest == digest_of(key) and parsed.images_per_minute == 30
    assert key not in entry, "the entry holds the hash, not the key"
    assert run_keys("new", "alice").stdout != result.stdout, "a new random key each time"

    assert run_keys("hash", stdin=key + "\n").stdout.strip() == digest_of(key).hex()

    path = write(tmp_path / "keys.toml", entry)
    checked = run_keys("check", str(path))
    assert checked.returncode == 0 and "1 key: alice" in checked.stdout
    broken = run_keys("check", str(write(tmp_path / "bad.toml", entry + "weight = 0\n")))
    assert broken.returncode == 1 and "line 4" in broken.stderr

    refused = run_keys("new", "default")
    assert refused.returncode == 2 and "API_KEY's" in refused.stderr and "sk-sd35-" not in refused.stdout
