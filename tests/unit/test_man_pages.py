"""pcc(8) and pcc.conf(5) are what docs/man/generate.py writes from the code's
own definitions (so they cannot drift), name every option and every key of
the shipped pcc.conf, and render with man(1) without a warning."""
import configparser
import importlib.util
import os
import shutil
import subprocess

import pytest
from conftest import ROOT, unavailable

from pcclib.cli import build_argument_parser
from pcclib.config import KEYS, LIST_KEYS

MAN = ROOT / "docs" / "man"


def generator():
    spec = importlib.util.spec_from_file_location("generate_man_pages", MAN / "generate.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.parametrize("name", ["pcc.8", "pcc.conf.5"])
def test_the_committed_page_is_what_the_generator_writes_now(name):
    assert (MAN / name).read_text() == generator().PAGES[name](), \
        f"docs/man/{name} is out of date: run .venv/bin/python docs/man/generate.py and commit it"


def rendered(name: str) -> str:
    if shutil.which("man") is None:
        unavailable("man (package man-db)")
    result = subprocess.run(["man", "--warnings", "-l", str(MAN / name)], capture_output=True, text=True,
                            env={**os.environ, "MANWIDTH": "200", "MAN_KEEP_FORMATTING": "", "LC_ALL": "C.UTF-8"},
                            timeout=60)
    assert result.returncode == 0 and result.stderr == "", result.stderr
    return result.stdout


def test_pcc_8_names_every_option_exit_status_signal_and_file():
    page = rendered("pcc.8")
    for action in build_argument_parser()._actions:
        for option in action.option_strings:
            assert option in page
    for heading in ("SYNOPSIS", "OPTIONS", "EXIT STATUS", "SIGNALS", "FILES", "EXAMPLES", "SEE ALSO"):
        assert f"\n{heading}\n" in page
    assert "SIGHUP" in page and "/etc/pcc.conf" in page


def test_pcc_conf_5_names_every_key_of_the_shipped_file_with_its_default():
    page = rendered("pcc.conf.5")
    shipped = configparser.ConfigParser(interpolation=None)
    shipped.read(ROOT / "pcc.conf")
    described = {(key.section, key.name) for key in KEYS} | {("list", key.name) for key in LIST_KEYS}
    for section in shipped.sections():
        for name in shipped.options(section):
            assert ("list" if section.startswith("list ") else section, name) in described
            assert f"\n       {name} = " in page
    assert "max_request_bytes = a whole number, 1024 to 16777216 (blank: 65536)" in page
    assert "action = reject or hold (required)" in page
