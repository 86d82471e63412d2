"""The use-case router: the packaged 17 routes, EventBridge's matching semantics, strict mode, validation of the
routes file, and the ``fpolicyd routes`` command."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import orjson
import pytest

from fpolicyd.cli.main import main
from fpolicyd.config import Settings, load_settings
from fpolicyd.errors import ConfigError
from fpolicyd.pipeline.router import (
    KNOWN_OPERATIONS,
    Route,
    Router,
    RouteTable,
    UnroutedAction,
    event_pattern,
    packaged_routes_text,
)

REPO = Path(__file__).resolve().parents[2]
PDF_ROUTES = (
    "legal-compliance",
    "financial-idp",
    "insurance-claims",
    "logistics-ocr",
    "education-research",
    "government-archives",
)

# The table of docs/reference-pipeline.md §5 (the 17 use-case routes), restated independently of the TOML file.
REFERENCE_TABLE = """
UC1 | legal-compliance | /legal/ /compliance/ /audit/ | .pdf .docx .xlsx | create write rename delete | ComplianceStateMachine
UC2 | financial-idp | /finance/ /invoices/ /contracts/ | .pdf .tiff .png .jpg | create write | IdpStateMachine
UC3 | manufacturing-analytics | /manufacturing/ /iot/ /sensors/ | .csv .json .parquet | create write | ManufacturingStateMachine
UC4 | media-vfx | /media/ /vfx/ /renders/ | .exr .dpx .mov .mp4 | create write rename | VfxStateMachine
UC5 | healthcare-dicom | /healthcare/ /dicom/ /medical/ | .dcm .dicom | create write | DicomStateMachine
UC6 | insurance-claims | /insurance/ /claims/ | .pdf .jpg .png .tiff | create write | InsuranceClaimsStateMachine
UC7 | construction-bim | /construction/ /bim/ /cad/ | .ifc .rvt .dwg .nwd | create write rename | ConstructionBimStateMachine
UC8 | genomics-pipeline | /genomics/ /sequencing/ | .fastq .bam .vcf .fasta | create write | GenomicsStateMachine
UC9 | logistics-ocr | /logistics/ /shipping/ /warehouse/ | .pdf .jpg .png .tiff | create write | LogisticsOcrStateMachine
UC10 | retail-catalog | /retail/ /catalog/ /products/ | .jpg .png .csv .json | create write rename | RetailCatalogStateMachine
UC11 | autonomous-driving | /autonomous/ /lidar/ /camera/ | .pcd .bag .mp4 .json | create write | AutonomousDrivingStateMachine
UC12 | semiconductor-eda | /eda/ /design/ /simulation/ | .gds .oasis .spice .lib | create write rename | EdaStateMachine
UC13 | energy-seismic | /energy/ /seismic/ /survey/ | .segy .sgy .las .json | create write | SeismicStateMachine
UC14 | education-research | /education/ /research/ /papers/ | .pdf .tex .docx .ipynb | create write rename | EducationResearchStateMachine
UC15 | defense-satellite | /defense/ /satellite/ /imagery/ | .tiff .nitf .jp2 .geotiff | create write | DiscoveryFunction (Lambda)
UC16 | government-archives | /government/ /archives/ /records/ | .pdf .tiff .xml | create write rename delete | DiscoveryFunction (Lambda)
UC17 | smart-city-geospatial | /smartcity/ /geospatial/ /gis/ | .geojson .shp .tiff .las | create write | DiscoveryFunction (Lambda)
"""  # noqa: E501


@pytest.fixture(scope="module")
def table() -> RouteTable:
    return RouteTable.load(None)


@pytest.fixture(scope="module")
def router(table: RouteTable) -> Router:
    return Router(table)


@pytest.fixture(scope="module")
def strict_router(table: RouteTable) -> Router:
    return Router(table, strict=True)


# ------------------------------------------------------------------------------------------ the data


def test_packaged_routes_are_the_reference_table(table: RouteTable) -> None:
    rows = [[cell.strip() for cell in line.split("|")] for line in REFERENCE_TABLE.strip().splitlines()]
    assert len(rows) == 17
    got = [
        (r.id, r.name, r.prefixes, r.suffixes, r.operations, r.target, r.sinks, bool(r.description))
        for r in table.routes
    ]
    want = [
        (uc, name, tuple(p.split()), tuple(s.split()), tuple(o.split()), target, (), True)
        for uc, name, p, s, o, target in rows
    ]
    assert got == want


def test_config_copy_is_identical_to_the_packaged_file_and_to_its_export(table: RouteTable) -> None:
    packaged = packaged_routes_text()
    assert (REPO / "config" / "routes.toml").read_text(encoding="utf-8") == packaged
    assert (REPO / "src" / "fpolicyd" / "data" / "routes.toml").read_text(encoding="utf-8") == packaged
    assert table.to_toml() == packaged


def test_to_toml_round_trips_awkward_text() -> None:
    route = Route(
        name="odd.route_1",
        id='id "quoted" \\ back',
        prefixes=("/tab\there/", "/ünïcode/日本/", "/ctl\x01\x1f\x7f/"),
        suffixes=(".x'y", "\\"),
        operations=("create", "symlink"),
        target="T\nnewline",
        sinks=("sqs:https://sqs.eu-west-1.amazonaws.com/123456789012/uc1", "stdout:"),
        description="",
    )
    original = RouteTable((route,))
    again = RouteTable.from_toml(original.to_toml())
    assert again == original
    assert again.routes[0] == route


# ------------------------------------------------------------------------------------------ matching


def test_reference_fan_out_example(router: Router) -> None:
    # docs/reference-pipeline.md §5: UC1 by prefix (and by suffix), and every .pdf use case by suffix, in file order.
    assert router.match("/legal/audit/report.pdf", "create") == PDF_ROUTES
    assert router.match("/legal/audit/report.txt", "create") == ("legal-compliance",)


def test_operation_is_anded_with_the_path(router: Router) -> None:
    assert router.match("/legal/audit/report.pdf", "delete") == ("legal-compliance", "government-archives")
    assert router.match("/legal/audit/report.pdf", "rename") == (
        "legal-compliance",
        "education-research",
        "government-archives",
    )
    for operation in sorted(KNOWN_OPERATIONS - {"create", "write", "rename", "delete"}):
        assert router.match("/legal/audit/report.pdf", operation) == ()
    assert router.match("/legal/audit/report.pdf", "CREATE") == ()
    assert router.match("/legal/audit/report.pdf", "no-such-operation") == ()


def test_matching_is_case_sensitive(router: Router) -> None:
    assert router.match("/Legal/audit/report.txt", "create") == ()
    assert router.match("/legal/audit/REPORT.PDF", "create") == ("legal-compliance",)
    assert router.match("/LEGAL/report.PDF", "create") == ()
    assert router.match("/scans/report.Pdf", "write") == ()


def test_prefixes_and_suffixes_are_strings_not_path_components(router: Router) -> None:
    assert router.match("/legal", "create") == ()  # the prefix is "/legal/"
    assert router.match("/legalese/brief.txt", "create") == ()
    assert router.match("/vol/legal/brief.txt", "create") == ()  # a prefix anchors at the start
    assert router.match("/tmp/report.pdf.bak", "create") == ()  # a suffix anchors at the end
    assert router.match("/tmp/notpdf", "create") == ()
    assert router.match("/tmp/x.pdf", "create") == PDF_ROUTES
    assert router.match(".pdf", "create") == PDF_ROUTES  # the whole path may be the suffix
    assert router.match("/legal/", "create") == ("legal-compliance",)  # ... or the prefix
    assert router.match("", "create") == ()
    assert router.match("/", "create") == ()


def test_suffixes_include_their_dot(router: Router) -> None:
    # ".tiff" is not a suffix of "a.geotiff", nor ".json" of "a.geojson": only the longer ones match.
    assert router.match("/sat/a.geotiff", "create") == ("defense-satellite",)
    assert router.match("/city/a.geojson", "write") == ("smart-city-geospatial",)
    assert router.match("/x/well.las", "write") == ("energy-seismic", "smart-city-geospatial")


def test_overlapping_prefixes_and_suffixes_of_different_lengths() -> None:
    routes = [
        ("short", ["/a"], ["f"]),
        ("long", ["/a/b/"], [".tiff"]),
        ("mid", ["/a/"], ["tiff"]),
        ("other", ["/b"], [".tif"]),
    ]
    text = "".join(
        f'[[route]]\nname = "{name}"\nid = "{name}"\nprefixes = {prefixes}\nsuffixes = {suffixes}\n'
        'operations = ["write"]\ntarget = "T"\n'
        for name, prefixes, suffixes in routes
    ).replace("'", '"')
    router = Router(RouteTable.from_toml(text))
    assert router.match("/a/b/c", "write") == ("short", "long", "mid")
    assert router.match("/ab", "write") == ("short",)
    assert router.match("/x.tiff", "write") == ("short", "long", "mid")
    assert router.match("/x.geotiff", "write") == ("short", "mid")
    assert router.match("/x.tif", "write") == ("short", "other")
    assert router.match("/b", "write") == ("other",)
    assert router.match("f", "write") == ("short",)
    assert Router(RouteTable.from_toml(text), strict=True).match("/x.tiff", "write") == ()


def test_a_deep_chain_of_nested_prefixes() -> None:
    # Each prefix extends the previous one: the index is a chain as deep as the longest prefix is long.
    depth = 1500
    routes = tuple(
        Route(name=f"r{k}", id=f"R{k}", prefixes=("/" + "a" * k,), suffixes=(), operations=("write",), target="T")
        for k in range(depth)
    )
    router = Router(RouteTable(routes))
    assert router.match("/" + "a" * (depth + 5), "write") == tuple(f"r{k}" for k in range(depth))
    assert router.match("/" + "a" * 10 + "b", "write") == tuple(f"r{k}" for k in range(11))


def test_routes_by_name_finds_what_match_names(router: Router) -> None:
    names = router.match("/legal/audit/report.pdf", "create")
    assert [router.routes_by_name[name].id for name in names] == ["UC1", "UC2", "UC6", "UC9", "UC14", "UC16"]
    assert router.routes_by_name["defense-satellite"].target == "DiscoveryFunction (Lambda)"


def test_strict_mode_counts_prefixes_only(strict_router: Router) -> None:
    assert strict_router.match("/legal/audit/report.pdf", "create") == ("legal-compliance",)
    assert strict_router.match("/tmp/report.pdf", "create") == ()
    assert strict_router.match("/media/clip.mov", "rename") == ("media-vfx",)
    assert strict_router.match("/media/clip.mov", "delete") == ()


def test_explain_agrees_with_match_and_says_why(router: Router, strict_router: Router) -> None:
    for r in (router, strict_router):
        for path in ("/legal/audit/report.pdf", "/tmp/x.tiff", "/nothing", ""):
            for operation in sorted(KNOWN_OPERATIONS):
                explained = tuple(e.route for e in r.explain(path, operation) if e.matched)
                assert explained == r.match(path, operation)

    by_route = {e.route: e for e in router.explain("/legal/audit/report.pdf", "delete")}
    assert len(by_route) == 17
    uc1 = by_route["legal-compliance"]
    assert uc1.matched
    assert uc1.matched_prefixes == ("/legal/",)
    assert uc1.matched_suffixes == (".pdf",)
    assert uc1.reason == "prefix '/legal/', suffix '.pdf'; operation 'delete' listed"
    idp = by_route["financial-idp"]
    assert not idp.matched
    assert idp.path_matched
    assert not idp.operation_ok
    assert idp.reason == "suffix '.pdf'; operation 'delete' not listed"
    assert by_route["media-vfx"].path_reason == "no prefix/suffix matched"

    strict = {e.route: e for e in strict_router.explain("/tmp/x.pdf", "create")}
    assert not strict["financial-idp"].matched
    assert strict["financial-idp"].path_reason == "no prefix matched; suffix '.pdf' ignored (strict)"
    assert strict["media-vfx"].path_reason == "no prefix matched"


def test_results_follow_the_file_order_not_the_match_kind() -> None:
    text = """
[[route]]
name = "by-suffix"
id = "A"
suffixes = [".csv"]
operations = ["write"]
target = "T"

[[route]]
name = "by-prefix"
id = "B"
prefixes = ["/data/"]
operations = ["write"]
target = "T"
"""
    router = Router(RouteTable.from_toml(text))
    assert router.match("/data/x.csv", "write") == ("by-suffix", "by-prefix")


def test_event_pattern_is_the_reference_rule(table: RouteTable) -> None:
    uc5 = next(route for route in table.routes if route.id == "UC5")
    assert event_pattern(uc5, source="fsxn.fpolicy", detail_type="FPolicy File Operation") == {
        "source": ["fsxn.fpolicy"],
        "detail-type": ["FPolicy File Operation"],
        "detail": {
            "file_path": [
                {"prefix": "/healthcare/"},
                {"prefix": "/dicom/"},
                {"prefix": "/medical/"},
                {"suffix": ".dcm"},
                {"suffix": ".dicom"},
            ],
            "operation_type": ["create", "write"],
        },
    }
    strict = event_pattern(uc5, source="s", detail_type="d", strict=True)
    assert strict is not None
    assert strict["detail"]["file_path"] == [{"prefix": "/healthcare/"}, {"prefix": "/dicom/"}, {"prefix": "/medical/"}]
    suffix_only = Route(name="s", id="S", prefixes=(), suffixes=(".x",), operations=("create",), target="T")
    assert event_pattern(suffix_only, source="s", detail_type="d", strict=True) is None


# ---------------------------------------------------------------------------------------- validation

VALID = """
[[route]]
name = "first"
id = "R1"
prefixes = ["/a/"]
suffixes = [".a"]
operations = ["create"]
target = "T1"

[[route]]
name = "second"
id = "R2"
description = "the one that gets broken"
prefixes = ["/b/"]
suffixes = [".b"]
operations = ["create", "write"]
target = "T2"
sinks = ["sqs:https://sqs.eu-west-1.amazonaws.com/123456789012/second"]
"""


def broken(old: str, new: str) -> str:
    """VALID with one edit in the second route."""
    head, sep, second = VALID.rpartition("[[route]]")
    assert old in second
    return head + sep + second.replace(old, new, 1)


@pytest.mark.parametrize(
    ("text", "message"),
    [
        (broken('target = "T2"', 'target = "T2"\ncolour = "red"'), r"route #2 'second': unknown key\(s\) \['colour'\]"),
        (broken('prefixes = ["/b/"]\nsuffixes = [".b"]', "prefixes = []\nsuffixes = []"), "#2 'second': prefixes and"),
        (broken('prefixes = ["/b/"]\nsuffixes = [".b"]', ""), r"#2 'second': prefixes and suffixes are both empty"),
        (broken('["create", "write"]', '["create", "wrote"]'), r"#2 'second': operations: unknown operation 'wrote'"),
        (broken('["create", "write"]', '["Create"]'), r"#2 'second': operations: unknown operation 'Create'"),
        (broken('["create", "write"]', "[]"), r"#2 'second': operations: must list at least one"),
        (broken('name = "second"', 'name = "first"'), r"#2 'first': name: 'first' is already used by route #1"),
        (broken('id = "R2"', 'id = "R1"'), r"#2 'second': id: 'R1' is already used by route #1"),
        (broken('["/b/"]', '["b/"]'), r"#2 'second': prefixes: 'b/' must start with '/'"),
        (broken('["/b/"]', '[""]'), r"#2 'second': prefixes: '' must start with '/'"),
        (broken('[".b"]', '[".b", ""]'), r"#2 'second': suffixes: an empty suffix"),
        (broken('["/b/"]', '["/b/", "/b/"]'), r"#2 'second': prefixes: \['/b/'\] listed more than once"),
        (broken('["/b/"]', '"/b/"'), r"#2 'second': prefixes: must be a list of strings"),
        (broken('["/b/"]', "[1]"), r"#2 'second': prefixes: must be a list of strings"),
        (broken('target = "T2"', "target = 2"), r"#2 'second': target: must be a string"),
        (broken('target = "T2"', 'target = " "'), r"#2 'second': target: must not be empty"),
        (broken('target = "T2"', ""), r"#2 'second': missing key\(s\) \['target'\]"),
        (broken('name = "second"', 'name = "sec ond"'), r"#2 'sec ond': name: must be 1-64 letters"),
        (broken('name = "second"', 'name = "' + "n" * 65 + '"'), r"name: must be 1-64 letters"),
        (broken("sqs:https", "kafka:https"), r"#2 'second': sinks: 'kafka:https.*a sink is one of"),
        (broken('"sqs:https://sqs.eu-west-1.amazonaws.com/123456789012/second"', '"sqs:"'), r"sinks: 'sqs:'.*target"),
        ("version = 2\n" + VALID, r"unknown top-level key\(s\) \['version'\]"),
        ('route = "all"\n', r"'route' must be an array of tables"),
        ("", "defines no routes"),
        ("[[route]\n", "not valid TOML"),
    ],
)
def test_a_bad_routes_file_names_the_route_and_the_field(text: str, message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        RouteTable.from_toml(text, source="my-routes.toml")
    with pytest.raises(ConfigError, match=r"^my-routes\.toml: "):
        RouteTable.from_toml(text, source="my-routes.toml")


def test_the_valid_example_loads() -> None:
    table = RouteTable.from_toml(VALID)
    assert [route.name for route in table.routes] == ["first", "second"]
    assert table.routes[1].sinks == ("sqs:https://sqs.eu-west-1.amazonaws.com/123456789012/second",)
    assert table.routes[0].sinks == ()
    assert table.routes[0].description == ""


def test_a_programmatic_table_is_validated_too() -> None:
    good = Route(name="r", id="R", prefixes=("/x/",), suffixes=(), operations=("create",), target="T")
    with pytest.raises(ConfigError, match=r"route #2 'r': name: 'r' is already used by route #1"):
        RouteTable((good, good))
    with pytest.raises(ConfigError, match="lone surrogate"):
        RouteTable((Route(name="r", id="R", prefixes=("/\ud800/",), suffixes=(), operations=("create",), target="T"),))


def test_load_reads_a_file_and_names_a_missing_one(tmp_path: Path) -> None:
    path = tmp_path / "routes.toml"
    path.write_text(VALID, encoding="utf-8")
    assert RouteTable.load(path) == RouteTable.from_toml(VALID)
    with pytest.raises(ConfigError, match=re.escape(f"routes file {tmp_path / 'missing.toml'}")):
        RouteTable.load(tmp_path / "missing.toml")
    path.write_text(broken('["create", "write"]', '["creat"]'), encoding="utf-8")
    with pytest.raises(ConfigError, match=re.escape(f"{path}: route #2 'second': operations")):
        RouteTable.load(path)


# ------------------------------------------------------------------------------------------ settings


@pytest.fixture
def clean_env(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> Path:
    for name in list(os.environ):
        if name.startswith("FPOLICYD_"):
            monkeypatch.delenv(name)
    monkeypatch.chdir(tmp_path)  # no ./fpolicyd.toml is picked up by accident
    return tmp_path


def test_routing_settings(clean_env: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    defaults = load_settings()
    assert defaults.routing_enabled is True
    assert defaults.routes_file is None
    assert defaults.routes_strict is False
    assert defaults.unrouted_action is UnroutedAction.DEFAULT_SINKS
    monkeypatch.setenv("FPOLICYD_UNROUTED_ACTION", "audit")
    monkeypatch.setenv("FPOLICYD_ROUTES_STRICT", "true")
    monkeypatch.setenv("FPOLICYD_ROUTES_FILE", "/etc/fpolicyd/routes.toml")
    settings = load_settings()
    assert settings.unrouted_action is UnroutedAction.AUDIT
    assert settings.routes_strict is True
    assert settings.routes_file == Path("/etc/fpolicyd/routes.toml")
    monkeypatch.setenv("FPOLICYD_UNROUTED_ACTION", "drop")
    with pytest.raises(ConfigError, match="unrouted_action"):
        load_settings()


# ------------------------------------------------------------------------------------------- the CLI


def run_cli(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str, str]:
    code = main(["routes", *argv])
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def test_check_prints_matches_and_reasons(clean_env: Path, capsys: pytest.CaptureFixture[str]) -> None:
    code, out, _ = run_cli(capsys, "check", "/legal/audit/report.pdf", "--op", "create")
    assert code == 0
    assert "matches 6 route(s): legal-compliance, financial-idp, insurance-claims" in out
    assert re.search(r"MATCH UC1 +legal-compliance +prefix '/legal/', suffix '.pdf'; operation 'create' listed", out)
    assert "-> ComplianceStateMachine" in out
    assert "11 other route(s): no prefix/suffix matched" in out

    code, out, _ = run_cli(capsys, "check", "/legal/audit/report.pdf", "--op", "read")
    assert code == 0
    assert "matches no route" in out
    assert re.search(r"no +UC2 +financial-idp +suffix '.pdf'; operation 'read' not listed", out)

    code, out, _ = run_cli(capsys, "check", "/tmp/report.pdf", "--op", "create", "--strict")
    assert "matches no route" in out
    assert "ignored (strict)" in out


def test_check_json(clean_env: Path, capsys: pytest.CaptureFixture[str]) -> None:
    code, out, _ = run_cli(capsys, "check", "/legal/audit/report.pdf", "--op", "delete", "--json")
    assert code == 0
    document = orjson.loads(out)
    assert document["routes"] == ["legal-compliance", "government-archives"]
    assert document["strict"] is False
    assert len(document["explanations"]) == 17
    assert document["explanations"][0] == {
        "route": "legal-compliance",
        "id": "UC1",
        "target": "ComplianceStateMachine",
        "matched": True,
        "path_matched": True,
        "matched_prefixes": ["/legal/"],
        "matched_suffixes": [".pdf"],
        "operation_ok": True,
        "reason": "prefix '/legal/', suffix '.pdf'; operation 'delete' listed",
    }


def test_export_eventbridge_uses_the_settings_source_and_detail_type(
    clean_env: Path, capsys: pytest.CaptureFixture[str], table: RouteTable
) -> None:
    code, out, err = run_cli(capsys, "export", "--format", "eventbridge")
    assert (code, err) == (0, "")
    patterns = orjson.loads(out)
    assert list(patterns) == [route.name for route in table.routes]
    source = Settings.model_fields["eventbridge_source"].default
    detail_type = Settings.model_fields["eventbridge_detail_type"].default
    assert (source, detail_type) == ("fsxn.fpolicy", "FPolicy File Operation")
    for route in table.routes:
        assert patterns[route.name] == event_pattern(route, source=source, detail_type=detail_type)


def test_export_strict_drops_suffixes_and_says_which_routes_get_no_rule(
    clean_env: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    routes = clean_env / "routes.toml"
    routes.write_text(
        VALID
        + '\n[[route]]\nname = "suffix-only"\nid = "R3"\nsuffixes = [".z"]\noperations = ["write"]\ntarget = "T"\n',
        encoding="utf-8",
    )
    code, out, err = run_cli(capsys, "export", "--format", "eventbridge", "--routes", str(routes), "--strict")
    assert code == 0
    patterns = orjson.loads(out)
    assert list(patterns) == ["first", "second"]
    assert patterns["first"]["detail"]["file_path"] == [{"prefix": "/a/"}]
    assert "suffix-only: no prefixes, so strict mode leaves it no rule" in err


def test_export_toml_regenerates_the_config_copy(clean_env: Path, capsys: pytest.CaptureFixture[str]) -> None:
    code, out, _ = run_cli(capsys, "export", "--format", "toml")
    assert code == 0
    assert out == (REPO / "config" / "routes.toml").read_text(encoding="utf-8")


def test_the_routes_file_setting_is_the_default(
    clean_env: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    routes = clean_env / "routes.toml"
    routes.write_text(VALID, encoding="utf-8")
    monkeypatch.setenv("FPOLICYD_ROUTES_FILE", str(routes))
    code, out, _ = run_cli(capsys, "check", "/b/x", "--op", "write", "--json")
    assert code == 0
    assert orjson.loads(out)["routes"] == ["second"]
    monkeypatch.setenv("FPOLICYD_ROUTES_STRICT", "true")
    code, out, _ = run_cli(capsys, "check", "/x.b", "--op", "write", "--json")
    assert orjson.loads(out)["routes"] == []
    code, out, _ = run_cli(capsys, "check", "/x.b", "--op", "write", "--json", "--no-strict")
    assert orjson.loads(out)["routes"] == ["second"]


def test_a_bad_routes_file_exits_2_with_the_route_named(clean_env: Path, capsys: pytest.CaptureFixture[str]) -> None:
    routes = clean_env / "routes.toml"
    routes.write_text(broken('["/b/"]', '["b/"]'), encoding="utf-8")
    for argv in (("check", "/b/x", "--op", "create"), ("export", "--format", "cloudformation")):
        code, out, err = run_cli(capsys, *argv, "--routes", str(routes))
        assert code == 2
        assert out == ""
        assert (
            err
            == f"fpolicyd: {routes}: route #2 'second': prefixes: 'b/' must start with '/' (file_path is absolute)\n"
        )
    code, _, err = run_cli(capsys, "check", "/x\udcff", "--op", "create", "--json")  # undecodable argv byte
    assert code == 2
    assert "is not valid UTF-8" in err
    code, _, err = run_cli(capsys, "check", "/x", "--op", "create", "--routes", str(clean_env / "nope.toml"))
    assert code == 2
    assert "nope.toml" in err


def test_export_cloudformation_has_one_rule_per_route(
    clean_env: Path, capsys: pytest.CaptureFixture[str], table: RouteTable
) -> None:
    code, out, _ = run_cli(capsys, "export", "--format", "cloudformation")
    assert code == 0
    template = orjson.loads(out)
    rules = template["Resources"]
    assert len(rules) == 17
    assert {rule["Type"] for rule in rules.values()} == {"AWS::Events::Rule"}
    uc1 = rules["LegalComplianceRule"]["Properties"]
    assert uc1["EventBusName"] == {"Ref": "EventBusName"}
    assert uc1["EventPattern"] == event_pattern(
        table.routes[0], source="fsxn.fpolicy", detail_type="FPolicy File Operation"
    )
    assert uc1["Targets"][0]["Arn"] == {"Ref": "ComplianceStateMachineArn"}
    # UC15-17 share one target, hence one parameter.
    lambda_param = "DiscoveryFunctionLambdaArn"
    assert [r["Properties"]["Targets"][0]["Arn"] for r in rules.values()].count({"Ref": lambda_param}) == 3
    assert set(template["Parameters"]) == {"EventBusName", "TargetRoleArn", lambda_param} | {
        f"{route.target}Arn" for route in table.routes[:14]
    }


@pytest.mark.slow
def test_exported_template_passes_cfn_lint(clean_env: Path, capsys: pytest.CaptureFixture[str]) -> None:
    cfn_lint = shutil.which("cfn-lint", path=str(Path(sys.executable).parent))
    assert cfn_lint is not None, "cfn-lint is a dev dependency (pyproject.toml)"
    code, out, _ = run_cli(capsys, "export", "--format", "cloudformation")
    assert code == 0
    template = clean_env / "routes.template.json"
    template.write_text(out, encoding="utf-8")
    result = subprocess.run(
        [cfn_lint, "--regions", "us-east-1", "--", str(template)],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert result.returncode == 0, result.stdout + result.stderr
