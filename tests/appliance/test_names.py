"""The one validator of variant, team and node names, and the actions that enforce it whatever the entry point."""
import pytest
from django.core.exceptions import ValidationError

from appliance import actions
from appliance.models import ModelVariant, Team
from appliance.names import NAME_MAX, InvalidName, check_name, is_valid_name

# Each refused name with the words its message must contain.
REFUSED = [
    ("", "it is empty"),
    ("..", "the character '.'"),
    ("../x", "the character '.'"),
    ("/abs", "the path separator '/'"),
    ("a/b", "the path separator '/'"),
    ("a\\b", "the path separator '\\\\'"),
    ("a\x00b", "a NUL character"),
    ("my model", "whitespace (' ')"),
    ("tab\there", "whitespace ('\\t')"),
    ("Demo", "the upper-case letter 'D'"),
    ("d\u0435mo", "the non-ASCII character 'е' (U+0435)"),  # Cyrillic e, looks like Latin e
    ("dеmо-ᴅense", "non-ASCII"),
    ("-leading", "does not start with a letter or digit"),
    ("_leading", "does not start with a letter or digit"),
    ("x" * (NAME_MAX + 1), f"65 characters long, more than {NAME_MAX}"),
    ("x" * 10_000, "10000 characters long"),
    ("a;rm -rf", "the character ';'"),
]


@pytest.mark.parametrize("name", ["demo-dense", "a", "0", "x_1-y", "console-jane-doe", "x" * NAME_MAX])
def test_it_accepts_bounded_lower_case_slugs(name):
    assert check_name(name, field="variant name") == name
    assert is_valid_name(name)


@pytest.mark.parametrize("name,problem", REFUSED)
def test_it_refuses_names_that_are_not_slugs_naming_the_field_and_the_problem(name, problem):
    with pytest.raises(InvalidName) as refused:
        check_name(name, field="team name")
    message = str(refused.value)
    assert message.startswith("team name ")
    assert problem in message
    assert len(message) < 300  # a 10k-character name is not echoed back whole
    assert not is_valid_name(name)


def test_it_refuses_what_is_not_text():
    with pytest.raises(InvalidName, match="variant name must be text, not int"):
        check_name(3, field="variant name")


def test_the_model_fields_validate_with_the_same_rule():
    with pytest.raises(ValidationError, match="variant name '../x' is refused"):
        ModelVariant(name="../x", kind="dense", source_path="/x").full_clean()
    with pytest.raises(ValidationError, match="team name 'Research' is refused: it contains the upper-case"):
        Team(name="Research").full_clean(exclude=["console_user"])


@pytest.mark.django_db
@pytest.mark.parametrize("name,problem", [("", "it is empty"), ("../x", "'.'"), ("/abs", "'/'")])
def test_an_import_with_a_bad_name_is_refused_before_anything_is_registered(name, problem, demo_dir):
    with pytest.raises(InvalidName, match=problem):
        actions.do_start_import(name=name, kind="dense", source_path=str(demo_dir / "demo-dense"), actor="test")
    assert not ModelVariant.objects.exists()


@pytest.mark.django_db
def test_a_team_with_a_bad_name_is_refused():
    with pytest.raises(InvalidName, match="team name 'a b' is refused: it contains whitespace"):
        actions.do_create_team("a b", actor="test")
    assert not Team.objects.exists()


@pytest.mark.django_db
@pytest.mark.parametrize("username", ["Jane.Doe@example.com", "日本語", "x" * 150, "--"])
def test_console_teams_are_valid_names_whatever_the_user_name(username):
    key, _ = actions.do_issue_console_key(username, ttl_s=60)
    assert is_valid_name(key.team.name)
    assert key.team.name.startswith("console-")
