"""Property-based requests generated from the app's own OpenAPI schema: none may get a 5xx, and every
successful JSON answer matches its route's response model."""
import pytest
import schemathesis
from schemathesis.checks import response_schema_conformance
from hypothesis import HealthCheck, given, settings

from aigc.serve.app import create_app
from aigc.serve.registry import Registry
from aigc.settings import Settings
from tests.serve.conftest import seed_billing
from tests.serve.helpers import add_key, db, tenant


@pytest.fixture(scope="module")
def fuzz_app(tmp_path_factory, text_model, image_model):
    settings = Settings(home=tmp_path_factory.mktemp("fuzz"), admin_token="operator-secret")
    sessions = db(settings)
    seed_billing(sessions)
    org, _ = tenant(sessions, "fuzz", "payg")
    admin = add_key(sessions, org, "admin@fuzz.example", "admin")
    app = create_app(settings, Registry.from_paths([f"rand={text_model}", f"shapes={image_model}"], echo=["echo"],
                                                   max_batch=4, context=128))
    return app, admin


def test_no_server_errors(fuzz_app):
    app, admin = fuzz_app
    schema = schemathesis.openapi.from_asgi("/openapi.json", app)
    operations = [result.ok() for result in schema.get_all_operations()]
    assert len(operations) >= 15
    failures, calls, conforming = [], [], []
    for op in operations:
        @given(case=op.as_strategy())
        @settings(max_examples=12, deadline=None, suppress_health_check=list(HealthCheck), database=None)
        def check(case):
            for token in (admin, "operator-secret"):  # as a tenant admin and as the operator
                response = case.call(headers={"Authorization": f"Bearer {token}"})
                calls.append(response.status_code)
                if response.status_code >= 500:
                    failures.append(f"{case.method} {case.formatted_path} {case.body!r:.200} -> {response.status_code}: {response.text[:200]}")
                elif response.status_code < 300 and "application/json" in str(response.headers.get("content-type")):
                    try:
                        case.validate_response(response, checks=[response_schema_conformance])
                        conforming.append(case.formatted_path)
                    except AssertionError as exc:
                        failures.append(f"{case.method} {case.formatted_path}: the answer does not match its schema: {str(exc)[:300]}")
        check()
    assert not failures, "\n".join(failures[:10])
    assert len(calls) > 200 and any(c < 300 for c in calls) and any(400 <= c < 500 for c in calls)
    assert len(set(conforming)) >= 5, conforming  # answers of several routes were checked against their models


def test_every_json_route_declares_its_answer(fuzz_app):
    app, _ = fuzz_app
    spec = app.openapi()
    missing = []
    for path, ops in spec["paths"].items():
        for method, op in ops.items():
            ok = {k: v for k, v in op["responses"].items() if k.startswith("2")}
            content = {ct: v for r in ok.values() for ct, v in r.get("content", {}).items()}
            if "application/json" in content and not content["application/json"].get("schema", {}):
                missing.append(f"{method.upper()} {path}")
            if not op.get("description") and not op.get("summary"):
                missing.append(f"{method.upper()} {path}: no description")
    assert not missing, missing
