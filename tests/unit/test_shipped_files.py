"""The files pcc ships say what the code does: the package's modules import
one way and keep to their own names, pcc.py is the thin script, the systemd
unit is hardened, the docs and pcc.conf give one rule for the configuration
file's mode, README stays a newcomer's page, and the docs name every option."""
import ast
import re
import shutil
import subprocess

from conftest import ROOT, unavailable

from pcclib.cli import build_argument_parser


ADMINISTRATION = ROOT / "docs" / "administration.md"


def test_one_rule_for_the_config_files_mode():
    docs, shipped = (ADMINISTRATION.read_text() + (ROOT / "README.md").read_text(), (ROOT / "pcc.conf").read_text())
    for text in (docs, shipped):
        assert "mode 600" not in text and "chmod 600" not in text
    assert "chown root:pcc /etc/pcc.conf; chmod 640 /etc/pcc.conf" in shipped
    assert "`chown root:pcc`" in docs and "`chmod 640`" in docs
    postinst = (ROOT / "debian" / "postfix-country-control.postinst").read_text()
    assert "chown root:pcc /etc/pcc.conf\n        chmod 0640 /etc/pcc.conf" in postinst


def test_readme_is_a_newcomers_page_with_two_commands_and_the_way_on():
    readme = (ROOT / "README.md").read_text()
    assert len(readme.splitlines()) <= 300
    commands = re.findall(r"^\d\. [^\n]*(?:\n[^\n]+)*\n\n {7}(\S[^\n]*)$", readme, re.M)
    assert commands[:2] == ["python3 -m venv .venv && .venv/bin/pip install -r requisites.txt && "
                            ".venv/bin/python pcc.py -d --stderr --config pcc.conf", "bash .ci/run"]
    for linked in re.findall(r"\]\(([\w/.]+\.md)\)", readme):
        assert (ROOT / linked).is_file(), linked


def test_the_administrators_docs_name_every_long_option():
    readme = ADMINISTRATION.read_text()
    options = [option for action in build_argument_parser()._actions for option in action.option_strings
               if option.startswith("--") and option != "--help"]
    assert len(options) > 15
    missing = [option for option in options if f"`{option}" not in readme and f"/`{option}`" not in readme]
    assert missing == []


# The modules of pcclib, each importing only those before it: written once, in
# the package's map (pcclib/__init__.py); docs/architecture.md's table must say the same.
MODULE_ORDER = re.findall(r"^  (\w+) ", (ROOT / "pcclib" / "__init__.py").read_text(), re.M)


def imports_of(module: str) -> set:
    """The pcclib modules `module` imports, for annotations too (an import
    under TYPE_CHECKING is a circle all the same)."""
    tree = ast.parse((ROOT / "pcclib" / f"{module}.py").read_text())
    return {node.module for node in ast.walk(tree) if isinstance(node, ast.ImportFrom) and node.level == 1}


def test_every_module_is_in_the_map_and_imports_only_those_above_it():
    modules = sorted(path.stem for path in (ROOT / "pcclib").glob("*.py") if path.stem != "__init__")
    assert modules == sorted(MODULE_ORDER)
    for position, module in enumerate(MODULE_ORDER):
        above = set(MODULE_ORDER[:position])
        assert imports_of(module) <= above, (module, imports_of(module) - above)
    assert len(MODULE_ORDER) > 20
    architecture = (ROOT / "docs" / "architecture.md").read_text()
    assert re.findall(r"^\| `(\w+)` \|", architecture, re.M)[:len(MODULE_ORDER)] == MODULE_ORDER


def test_no_module_reaches_into_another_modules_private_names():
    for module in MODULE_ORDER:
        tree = ast.parse((ROOT / "pcclib" / f"{module}.py").read_text())
        for node in ast.walk(tree):
            if isinstance(node, ast.ImportFrom) and node.level == 1:
                private = [alias.name for alias in node.names if alias.name.startswith("_")
                           and alias.name != "__version__"]
                assert not private, (module, node.module, private)


def test_every_module_says_what_it_is_for():
    for module in MODULE_ORDER:
        docstring = ast.get_docstring(ast.parse((ROOT / "pcclib" / f"{module}.py").read_text()))
        assert docstring and len(docstring) > 60, module


def test_every_modules_tunables_come_before_its_first_function_or_class():
    """A module's constants are at its top, where its reader looks for them;
    only a table computed by a helper of the module comes after that helper
    (and what is derived from it)."""
    late = []
    for module in MODULE_ORDER:
        tree = ast.parse((ROOT / "pcclib" / f"{module}.py").read_text())
        defined = {node.name for node in tree.body if isinstance(node, (ast.FunctionDef, ast.ClassDef))}
        seen_definition = False
        for node in tree.body:
            seen_definition = seen_definition or isinstance(node, (ast.FunctionDef, ast.ClassDef))
            targets = node.targets if isinstance(node, ast.Assign) else [node.target] \
                if isinstance(node, ast.AnnAssign) else []
            names = [target.id for target in targets if isinstance(target, ast.Name)
                     and re.fullmatch(r"[A-Z][A-Z0-9_]+", target.id)]
            if not names or not seen_definition:
                continue
            used = {name.id for name in ast.walk(node.value) if isinstance(name, ast.Name)}
            if used & defined:
                defined.update(names)  # a computed table: what is derived from it may follow it
            else:
                late.append(f"{module}.py:{node.lineno} {names[0]}")
    assert late == []


def test_pcc_py_is_the_thin_script():
    script = (ROOT / "pcc.py").read_text()
    assert len(script.splitlines()) <= 40
    tree = ast.parse(script)
    assert [node.name for node in tree.body if isinstance(node, (ast.FunctionDef, ast.ClassDef))] == []
    assert "from pcclib.cli import main" in script


def test_the_systemd_unit_is_hardened():
    if shutil.which("systemd-analyze") is None:
        unavailable("systemd-analyze (Debian's systemd package)")
    result = subprocess.run(["systemd-analyze", "security", "--offline=true", str(ROOT / "pcc.service")],
                            capture_output=True, text=True, timeout=60)
    exposure = float(result.stdout.rsplit("Overall exposure level for pcc.service:", 1)[1].split()[0])
    assert exposure < 2.0, result.stdout[-2000:]
    unit = (ROOT / "pcc.service").read_text()
    for line in ("MemoryMax=", "TasksMax=", "IPAddressDeny=any", "IPAddressAllow=localhost"):
        assert f"\n{line}" in unit, line


def test_every_test_file_says_what_it_tests_in_its_own_words():
    """A unit file and its e2e twin that open with the same docstring leave
    the reader guessing which tests what."""
    openings = {}
    for path in sorted((ROOT / "tests").glob("*/test_*.py")):
        docstring = ast.get_docstring(ast.parse(path.read_text()))
        assert docstring, f"{path.name} does not say what it tests"
        openings.setdefault(docstring.splitlines()[0], []).append(f"{path.parent.name}/{path.name}")
    assert [files for files in openings.values() if len(files) > 1] == []


def test_every_database_url_the_docs_show_is_one_pcc_takes():
    """The High availability section's forms (several hosts, PgBouncer) pass
    the checks --check-config and the daemon make; the failover test uses
    the first of them."""
    from pcclib.config import database_url_problem

    readme = ADMINISTRATION.read_text()
    urls = re.findall(r"^\s+dbcon = (\S+)$", readme, re.MULTILINE)
    assert len(urls) >= 3 and any("prepare_threshold=none" in url for url in urls)
    for url in urls:
        assert database_url_problem(url) == "", url
    failover = (ROOT / "tests" / "e2e" / "test_failover.py").read_text()
    assert "?host=127.0.0.1:{self.primary_port}" in failover and "&target_session_attrs=read-write" in failover
