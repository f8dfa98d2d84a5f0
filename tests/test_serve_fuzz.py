"""Property-based fuzzing of the HTTP API from its own OpenAPI spec (schemathesis): no input gives a 5xx."""

import pytest
import schemathesis
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from schemathesis import GenerationMode

from vidiffuse.serve.settings import ServeSettings


@pytest.fixture(scope="module")
def api_app(tmp_path_factory):
    from vidiffuse.serve.app import create_app

    app = create_app(ServeSettings(home=tmp_path_factory.mktemp("fuzz-home"), monitor=False))
    _, secret = app.state.keys.create_key("fuzz", rate_per_minute=100_000, quota_per_day=100_000)
    app.state.fuzz_auth = {"Authorization": f"Bearer {secret}"}
    # one real job (no worker runs here: it stays queued) so that generated ids can hit an existing job too
    app.state.keys.create_job(app.state.keys.authenticate(secret), {"prompt": "a red circle", "seed": 1}, total=20)
    app.state.keys.worker_seen("fuzz-worker", "shapes")  # readiness (503 without a worker) is tested elsewhere
    return app


def _operations():
    from vidiffuse.serve.app import create_app

    # the spec does not depend on state: a throwaway app lists the operations for parametrization
    import tempfile
    from pathlib import Path

    app = create_app(ServeSettings(home=Path(tempfile.mkdtemp(prefix="vidiffuse-spec-")), monitor=False))
    return [(r.ok().method.upper(), r.ok().path) for r in schemathesis.openapi.from_asgi("/openapi.json", app).get_all_operations()]


@pytest.mark.parametrize("method, path", _operations())
def test_no_request_gets_a_server_error(api_app, method, path):
    schema = schemathesis.openapi.from_asgi("/openapi.json", api_app)
    operation = schema[path][method].ok() if hasattr(schema[path][method], "ok") else schema[path][method]

    # valid requests, and requests that break the spec (wrong types, missing fields, out-of-range values)
    cases = st.one_of(operation.as_strategy(GenerationMode.POSITIVE), operation.as_strategy(GenerationMode.NEGATIVE))

    @given(case=cases)
    @settings(max_examples=60, deadline=None, suppress_health_check=list(HealthCheck), database=None)
    def fuzz(case):
        if case.path.endswith("/events"):
            case.path_parameters = {"job_id": "0" * 32}  # a stream on a live job never ends by itself
        for auth in (api_app.state.fuzz_auth, {}):  # with a valid key and without one
            response = case.call(headers={**(case.headers or {}), **auth})
            assert response.status_code < 500, f"{method} {case.formatted_path}: {response.status_code} {response.text[:300]}"

    fuzz()
