"""Hostile names against a live box: fuzzed through the CLI and the console, each refused naming the problem.

Before the validator, `import_model --name ../x` deleted the directory next to the store, `--name ""` the store
itself and `--name ..` all of APPLIANCE_HOME; a non-slug team or variant made the console's pages answer 500.
Each test checks that nothing outside the store changed, the store is intact, web and worker are alive and the
ledger verifies.
"""
import html
import json
import re

import pytest

from tests.livebox import ConsoleSession

from .probes import assert_alive, shell, tree_digest

# (name, what the refusal must say); NUL cannot travel in argv, so it goes through call_command and the console.
FUZZ = [
    ("../x", "the character '.'"), ("..", "the character '.'"), ("", "it is empty"), ("/abs", "path separator '/'"),
    ("a/b", "path separator '/'"), ("d\u0435mo", "non-ASCII character 'е' (U+0435)"),
    ("x" * 10_000, "10000 characters long"), ("a\x00b", "NUL character"), ("my model", "whitespace"),
    ("Demo", "upper-case letter 'D'"), ("-rf", "does not start with a letter or digit"),
]


@pytest.fixture
def guarded(box, tmp_path):
    """Yield the paths a bad name would have reached (a sibling of the store, an absolute directory); check after
    the test that they, the store and APPLIANCE_HOME's own files are untouched and that the box is sound."""
    sibling = box.home / "x"  # where store/../x lands
    sibling.mkdir(exist_ok=True)
    (sibling / "keep.txt").write_text("outside the store")
    absolute = tmp_path / "absolute-target"
    absolute.mkdir()
    (absolute / "keep.txt").write_text("outside the store")
    store = box.home / "models"
    top_level = {p.name for p in box.home.iterdir()}
    before = [tree_digest(sibling), tree_digest(absolute), tree_digest(store)]
    yield absolute
    assert [tree_digest(sibling), tree_digest(absolute), tree_digest(store)] == before
    assert top_level <= {p.name for p in box.home.iterdir()}
    assert_alive(box)
    box.manage("audit_verify")


def test_the_cli_refuses_hostile_variant_and_team_names_with_a_clear_error(box, guarded):
    source = str(box.demo_dir / "demo-dense")
    for argv, refusal in [
        (("import_model", source, "--kind", "dense", "--name", "../x"), "variant name '../x' is refused: "
                                                                        "it contains the character '.'"),
        (("import_model", source, "--kind", "dense", "--name", ""), "variant name '' is refused: it is empty"),
        (("import_model", source, "--kind", "dense", "--name", str(guarded)), "it contains the path separator '/'"),
        (("create_api_key", "--team", "../x"), "team name '../x' is refused"),
        (("deploy", "Demo"), "variant name 'Demo' is refused: it contains the upper-case letter 'D'"),
        (("undeploy", ".."), "variant name '..' is refused"),
    ]:
        result = box.manage(*argv, check=False)
        assert result.returncode != 0 and refusal in result.stderr, (argv, result.stderr)


def test_every_command_refuses_every_fuzzed_name_naming_the_problem(box, guarded):
    code = f"""
import json
from django.core.management import call_command
from django.core.management.base import CommandError
names = json.loads({json.dumps(json.dumps([n for n, _ in FUZZ]))})
out = []
for name in names:
    # --opt=value and "--" so that a name starting with "-" reaches the command, not argparse's option parser.
    for args in (["import_model", {str(box.demo_dir / "demo-dense")!r}, "--kind", "dense", "--name=" + name],
                 ["create_api_key", "--team=" + name], ["deploy", "--", name], ["undeploy", "--", name]):
        try:
            call_command(*args)
            out.append([args[0], name, None])
        except CommandError as exc:
            out.append([args[0], name, str(exc)])
print(json.dumps(out))
"""
    results = shell(box, code)
    assert len(results) == 4 * len(FUZZ)
    problems = dict(FUZZ)
    for command, name, error in results:
        assert error is not None, f"{command} accepted {name!r}"
        field = "team name" if command == "create_api_key" else "variant name"
        assert error.startswith(f"{field} ") and problems[name] in error, (command, name, error)
        assert len(error) < 400  # a 10k-character name is not echoed back
    storable = [n for n, _ in FUZZ if "\x00" not in n]  # PostgreSQL refuses NUL even in a query
    counts = shell(box, "import json\nfrom appliance.models import ModelVariant, Team\n"
                        f"names = json.loads({json.dumps(json.dumps(storable))})\n"
                        "print(json.dumps([ModelVariant.objects.filter(name__in=names).count(),"
                        " Team.objects.filter(name__in=names).count()]))")
    assert counts == [0, 0]


class Console(ConsoleSession):
    """A staff member signed in to the live box's console over HTTP."""

    def form_errors(self, url: str, data: dict) -> str:
        """Post a form that must be refused; return its page's error list as text."""
        self.http.get(url)
        response = self.post(url, data)
        assert response.status_code == 200, f"{url} answered {response.status_code}, not the form with errors"
        return html.unescape(" ".join(re.findall(r'<ul class="errorlist[^"]*"[^>]*>(.*?)</ul>', response.text, re.S)))


@pytest.fixture(scope="module")
def console(box):
    return Console(box)


def form_refusal(field: str, name: str, problem: str) -> str:
    """Return what the console's form must say about name: the validator's words, or Django's own for the
    cases its form field checks first (empty, NUL, longer than the column)."""
    if not name:
        return "This field is required."
    if "\x00" in name:
        return "Null characters are not allowed."
    if len(name) > 100:
        return f"Ensure this value has at most 100 characters (it has {len(name)})."
    return f"{field} "


@pytest.mark.parametrize("name,problem", FUZZ, ids=[f"fuzz{i}" for i in range(len(FUZZ))])
def test_the_console_forms_refuse_every_fuzzed_name(box, console, guarded, name, problem):
    errors = console.form_errors("/admin/appliance/modelvariant/add/", {
        "name": name, "kind": "dense", "source_path": str(box.demo_dir / "demo-dense")})
    assert form_refusal("variant name", name, problem) in errors, errors
    if name and len(name) <= 100 and "\x00" not in name:
        assert problem in errors, errors
    errors = console.form_errors("/admin/appliance/team/add/", {"name": name, "all_variants": "on"})
    assert form_refusal("team name", name, problem) in errors, errors


LEGACY = ["../legacy", "Legacy Team", "", "a/b/c", "l\u0435gacy", "?x=1#y"]


def test_console_pages_survive_bad_names_already_in_the_database(box, console, guarded):
    """Rows written before the validator (or behind the registry's back) still render every page, never a 500."""
    names = json.dumps(json.dumps(LEGACY))
    shell(box, "import json\nfrom appliance.models import ModelVariant, Team\n"
               f"for n in json.loads({names}):\n"
               "    Team.objects.create(name=n)\n"
               "    ModelVariant.objects.create(name=n, kind='dense', source_path='/nowhere', status='failed')\n"
               "print('[]')")
    try:
        page = console.http.get("/admin/usage/")
        assert page.status_code == 200
        links = re.findall(r'href="(/admin/usage/(?:team|variant)/[^"]*)"', page.text)
        assert len(links) >= 2 * len(LEGACY)
        for url in ["/admin/", "/admin/appliance/team/", "/admin/appliance/modelvariant/", *links]:
            assert console.http.get(html.unescape(url)).status_code == 200, url
    finally:
        shell(box, "import json\nfrom appliance.models import ModelVariant, Team\n"
                   f"names = json.loads({names})\n"
                   "Team.objects.filter(name__in=names).delete()\n"
                   "ModelVariant.objects.filter(name__in=names).delete()\nprint('[]')")
