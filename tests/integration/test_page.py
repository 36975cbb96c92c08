"""The search page and the JSON API of `cliptuner serve --http-port`: real HTTP on 127.0.0.1, and the page in a
headless Chromium driven by Playwright (Debian's `chromium` package; `.ci/run` installs it). A second service, with
API keys, checks that the page asks for a key, keeps it in the tab's sessionStorage and sends it on every call."""

import base64
import http.client
import json
import shutil
import urllib.error
import urllib.request

import pytest
from service import FlowProcess, free_port

from cliptuner.serve.feedback import FEEDBACK_SUBDIR, FeedbackLog
from cliptuner.serve.keys import create_key
from cliptuner.train import synthetic

playwright_api = pytest.importorskip("playwright.sync_api", reason="pip install -e '.[dev]' installs playwright")

N_IMAGES = 12
LIMIT = 5  # one of the page's choices


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    workspace = tmp_path_factory.mktemp("page")
    pairs = synthetic.write_csv(workspace / "data", n_images=N_IMAGES, domain="domain", image_size=32)
    flow = FlowProcess(workspace, workspace / "serve.log", args=["--http-port", str(free_port())])
    flow.start()
    flow.http = f"http://127.0.0.1:{flow.args[1]}"
    flow.images = sorted((workspace / "data" / "images").glob("*.png"))
    flow.pairs = pairs
    try:
        yield flow
    finally:
        flow.stop()


@pytest.fixture(scope="module")
def keyed(tmp_path_factory):
    """The service with a keys file (a key per role in ``.keys``) and its gallery indexed."""
    workspace = tmp_path_factory.mktemp("page-keys")
    synthetic.write_csv(workspace / "data", n_images=N_IMAGES, domain="domain", image_size=32)
    keys_file = workspace / "keys.json"
    keys = {role: create_key(keys_file, role, name=f"page-{role}")[0] for role in ("search", "write", "admin")}
    flow = FlowProcess(
        workspace, workspace / "serve.log", args=["--keys-file", str(keys_file), "--http-port", str(free_port())]
    )
    flow.start()
    flow.http = f"http://127.0.0.1:{flow.args[3]}"
    flow.keys = keys
    flow.images = sorted((workspace / "data" / "images").glob("*.png"))
    try:
        docs = [{"id": path.name, "uri": f"images/{path.name}"} for path in flow.images]
        status, answer = call(flow, {"execEndpoint": "/index", "data": docs}, authorization=keys["write"])
        assert status == 200, answer
        yield flow
    finally:
        flow.stop()


def call(served, body, content_type="application/json", origin=None, authorization=None):
    """POST /post; (status, parsed JSON answer)."""
    data = body if isinstance(body, bytes) else json.dumps(body).encode()
    headers = {"Content-Type": content_type, **({"Origin": origin} if origin else {})}
    if authorization is not None:
        headers["Authorization"] = f"Bearer {authorization}"
    request = urllib.request.Request(served.http + "/post", data=data, method="POST", headers=headers)
    try:
        with urllib.request.urlopen(request, timeout=120) as response:
            return response.status, json.loads(response.read())
    except urllib.error.HTTPError as exc:
        return exc.code, json.loads(exc.read())


def get(served, path):
    try:
        with urllib.request.urlopen(served.http + path, timeout=30) as response:
            return response.status, response.headers.get("Content-Type"), response.read()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.headers.get("Content-Type"), exc.read()


def test_json_api_indexes_and_searches_by_text_and_base64_image(served):
    # the README's curl examples, sent with urllib
    docs = [{"id": path.name, "uri": f"images/{path.name}"} for path in served.images]
    status, answer = call(served, {"execEndpoint": "/index", "data": docs})
    assert status == 200, answer
    assert [d["id"] for d in answer["data"]] == [d["id"] for d in docs]

    status, answer = call(
        served, {"execEndpoint": "/search", "data": [{"text": "a large teal star"}], "parameters": {"limit": LIMIT}}
    )
    assert status == 200, answer
    query = answer["data"][0]
    assert query["model_version"] == "v1" and len(query["matches"]) == LIMIT
    assert query["scores"] == sorted(query["scores"], reverse=True)
    assert {m["id"] for m in query["matches"]} <= {d["id"] for d in docs}
    assert all(m["model_version"] == "v1" for m in query["matches"])

    target = served.images[3]
    blob = base64.b64encode(target.read_bytes()).decode()
    status, answer = call(served, {"exec_endpoint": "/search", "data": [{"blob": blob}], "parameters": {"limit": 2}})
    assert status == 200, answer
    best = answer["data"][0]["matches"][0]
    assert best["id"] == target.name and best["score"] == pytest.approx(1.0, abs=1e-4)  # the image finds itself


def test_json_api_reports_errors_as_text(served):
    status, answer = call(served, {"execEndpoint": "/search", "data": [{"uri": "/etc/passwd"}]})
    assert status == 422 and "not allowed" in answer["error"]
    status, answer = call(served, {"execEndpoint": "/train", "parameters": {"data": "no-such.csv", "wait": False}})
    assert status == 422 and "no-such.csv" in answer["error"]
    status, answer = call(served, b"{not json")
    assert status == 400 and "not JSON" in answer["error"]
    status, answer = call(served, {"execEndpoint": "/search", "data": [{"blob": "%%%"}]})
    assert status == 400 and "base64" in answer["error"]
    status, answer = call(served, {"execEndpoint": "/search", "data": [{"text": "x", "colour": 1}]})
    assert status == 400 and "colour" in answer["error"]
    # what a cross-site page could send: a simple (no preflight) request, or one from another origin
    status, answer = call(served, {"execEndpoint": "/status"}, content_type="text/plain")
    assert status == 415
    status, answer = call(served, {"execEndpoint": "/status"}, origin="http://evil.example")
    assert status == 403
    # values of the wrong type or shape, each refused by name
    for body, expected in (
        ({"execEndpoint": "/search", "data": [{"text": {"a": 1}}]}, "'text' must be a string"),
        ({"execEndpoint": "/search", "data": "a red circle"}, "'data' must be a list"),
        ({"execEndpoint": "/search", "data": [{"text": "x"}], "parameters": [5]}, "'parameters' must be an object"),
        ({"data": [{"text": "x"}]}, "'execEndpoint' must name an endpoint"),
        ({"execEndpoint": "/search", "data": [{"embedding": ["x"]}]}, "list of numbers"),
    ):
        status, answer = call(served, body)
        assert status == 400 and expected in answer["error"], (body, answer)
    # a body over the limit is refused from its Content-Length, before it is read
    connection = http.client.HTTPConnection("127.0.0.1", int(served.http.rsplit(":", 1)[1]), timeout=30)
    connection.putrequest("POST", "/post")
    connection.putheader("Content-Type", "application/json")
    connection.putheader("Content-Length", str(10**10))
    connection.endheaders()
    response = connection.getresponse()
    assert response.status == 413 and "over the limit" in json.loads(response.read())["error"]
    connection.close()
    # and the service still answers
    status, answer = call(
        served, {"execEndpoint": "/search", "data": [{"text": "a red circle"}], "parameters": {"limit": 2}}
    )
    assert status == 200 and len(answer["data"][0]["matches"]) == 2


def test_image_route_serves_only_images_under_the_roots(served):
    status, kind, body = get(served, "/image?uri=images/" + served.images[0].name)
    assert status == 200 and kind == "image/png" and body == served.images[0].read_bytes()
    for uri, expected in (
        ("/etc/passwd", 403),
        ("../serve.log", 403),
        ("http://127.0.0.1/x.png", 403),
        ("pairs.csv", 404),
        ("images/missing.png", 404),
    ):
        status, _, body = get(served, "/image?uri=" + urllib.request.quote(uri))
        assert status == expected, (uri, body)


def test_page_records_feedback_on_a_result(served):
    docs = [{"id": path.name, "uri": f"images/{path.name}"} for path in served.images]
    status, answer = call(served, {"execEndpoint": "/index", "data": docs})  # the gallery, whichever test ran first
    assert status == 200, answer
    chromium = shutil.which("chromium")
    assert chromium, "the page test needs Debian's chromium package (.ci/run installs it)"
    with FeedbackLog(served.workspace / FEEDBACK_SUBDIR) as log:
        after = log.stats()["last_seq"]
    with playwright_api.sync_playwright() as p:
        browser = p.chromium.launch(executable_path=chromium, headless=True, args=["--no-sandbox"])
        try:
            page = browser.new_page()
            errors = []
            page.on("pageerror", lambda exc: errors.append(str(exc)))
            page.goto(served.http + "/")
            expect = playwright_api.expect
            page.select_option("#limit", str(LIMIT))
            page.fill("#query", "a large teal star")
            page.click("#search")
            cards = page.locator("#results .card")
            expect(cards).to_have_count(LIMIT)
            shown = page.locator("#results .card .id").all_text_contents()
            version = page.locator("#results .card .version").first.text_content()

            cards.nth(1).get_by_role("button", name="good match").click()
            expect(cards.nth(1).locator(".feedback-status")).to_have_text("recorded: good match")
            cards.nth(1).get_by_role("button", name="good match").click()  # again: the same event, stored once
            expect(cards.nth(1).locator(".feedback-status")).to_have_text("recorded: good match (already)")
            cards.nth(0).get_by_role("button", name="not this").click()
            expect(cards.nth(0).locator(".feedback-status")).to_have_text("recorded: not this")
            assert not errors, errors
        finally:
            browser.close()
    with FeedbackLog(served.workspace / FEEDBACK_SUBDIR) as log:
        good, wrong = (r.event for r in log.events(after_seq=after))
        contents = log.contents(shown)
    assert good.shown == wrong.shown == tuple(shown)  # the ids shown, in order
    assert (good.chosen, good.wrong, wrong.chosen, wrong.wrong) == ((shown[1],), (), (), (shown[0],))
    assert good.query_text == wrong.query_text == "a large teal star" and good.query_image is None
    assert good.model_version == wrong.model_version == version
    assert good.event_id != wrong.event_id
    images = {path.name: path.read_bytes() for path in served.images}
    assert {doc_id: content.image for doc_id, content in contents.items()} == {i: images[i] for i in shown}


def test_page_searches_tunes_and_compares(served, tmp_path):
    status, kind, body = get(served, "/")
    assert status == 200 and kind.startswith("text/html") and b"<script" in body
    assert b"http://" not in body and b"https://" not in body  # no external assets
    chromium = shutil.which("chromium")
    assert chromium, "the page test needs Debian's chromium package (.ci/run installs it)"
    with playwright_api.sync_playwright() as p:
        browser = p.chromium.launch(executable_path=chromium, headless=True, args=["--no-sandbox"])
        try:
            page = browser.new_page()
            errors = []
            page.on("pageerror", lambda exc: errors.append(str(exc)))
            page.goto(served.http + "/")
            expect = playwright_api.expect
            expect(page.locator("#version")).to_have_text("v1")

            page.select_option("#limit", str(LIMIT))
            page.fill("#query", "a small magenta cross")
            page.click("#search")
            cards = page.locator("#results .card")
            expect(cards).to_have_count(LIMIT)
            expect(page.locator("#results .card .version").first).to_have_text("v1")
            scores = [float(s) for s in page.locator("#results .card .score").all_text_contents()]
            assert scores == sorted(scores, reverse=True)
            # every card shows its gallery image, loaded through /image
            page.wait_for_function(
                "[...document.querySelectorAll('#results .card img')].every(i => i.complete && i.naturalWidth > 0)"
            )

            # an image query: the image finds itself first
            page.set_input_files("#file", str(served.images[5]))
            expect(page.locator("#results .card .id").first).to_have_text(served.images[5].name)
            expect(page.locator("#results-caption")).to_contain_text(served.images[5].name)

            # an error from the service, shown as text
            page.fill("#pairs", "no-such.csv")
            page.click("#tune")
            expect(page.locator("#error")).to_contain_text("no-such.csv")

            # a run the gate refuses: the report says why, and the version serving stays
            page.fill("#pairs", served.pairs.name)
            page.fill("#epochs", "1")
            page.fill("#lr", "1e-9")  # learns nothing: no gain over the version serving
            page.fill("#batch", "8")
            page.click("#tune")
            expect(page.locator("#progress")).to_contain_text("state done", timeout=180_000)
            expect(page.locator("#progress")).to_contain_text("published v2 as a candidate")
            expect(page.locator("#tune-result")).to_contain_text("not promoted: mean_r5")
            expect(page.locator("#version")).to_have_text("v1")

            # a tuning run with the gate off: progress, then done and v3; the results before stay pinned next to the
            # results after
            page.fill("#query", "a small magenta cross")
            page.click("#search")
            expect(cards).to_have_count(LIMIT)
            page.fill("#lr", "0.0001")
            page.uncheck("#gate")
            page.click("#tune")
            expect(page.locator("#pinned .card")).to_have_count(LIMIT)
            expect(page.locator("#pinned-caption")).to_contain_text("model v1")
            expect(page.locator("#progress")).to_contain_text("published v3", timeout=180_000)
            expect(page.locator("#progress")).to_contain_text("state done")
            expect(page.locator("#tune-result")).to_contain_text("v1 → v3")
            expect(page.locator("#tune-result")).to_contain_text("gate off")
            expect(page.locator("#version")).to_have_text("v3")
            expect(page.locator("#results-caption")).to_contain_text("model v3", timeout=60_000)
            expect(page.locator("#results .card .version").first).to_have_text("v3")
            expect(page.locator("#pinned .card .version").first).to_have_text("v1")
            assert not errors, errors
        finally:
            browser.close()


def test_page_asks_for_a_key_and_sends_it_on_every_call(keyed):
    chromium = shutil.which("chromium")
    assert chromium, "the page test needs Debian's chromium package (.ci/run installs it)"
    key = keyed.keys["search"]
    with playwright_api.sync_playwright() as p:
        browser = p.chromium.launch(executable_path=chromium, headless=True, args=["--no-sandbox"])
        try:
            page = browser.new_page()
            errors, console = [], []
            page.on("pageerror", lambda exc: errors.append(str(exc)))
            page.on("console", lambda message: console.append(message.text))
            page.goto(keyed.http + "/")
            expect = playwright_api.expect
            # the first call answers 401: the page asks for a key, in a password field
            expect(page.locator("#key-form")).to_be_visible()
            expect(page.locator("#key-message")).to_contain_text("needs an API key")
            assert page.get_attribute("#key", "type") == "password"
            expect(page.locator("#version")).to_have_text("?")

            page.fill("#key", "ctk_000000000000_" + "A" * 43)  # a wrong key: asked again, with the reason
            page.click("#use-key")
            expect(page.locator("#key-message")).to_contain_text("not valid")
            expect(page.locator("#key-form")).to_be_visible()

            page.fill("#key", key)
            page.click("#use-key")
            expect(page.locator("#version")).to_have_text("v1")
            expect(page.locator("#key-form")).to_be_hidden()
            expect(page.locator("#forget-key")).to_be_visible()

            page.select_option("#limit", str(LIMIT))
            page.fill("#query", "a small magenta cross")
            page.click("#search")
            expect(page.locator("#results .card")).to_have_count(LIMIT)
            # /image needs the key too: every card's image came through fetch, shown from a blob: URL
            page.wait_for_function(
                "() => [...document.querySelectorAll('#results .card img')]"
                ".every(i => i.src.startsWith('blob:') && i.complete && i.naturalWidth > 0)"
            )
            assert page.evaluate("sessionStorage.getItem('cliptuner.key')") == key
            assert page.evaluate("localStorage.length") == 0
            assert key not in page.url and not any(key in text for text in console)

            # a role too low: the service's message, naming the role needed
            page.fill("#pairs", "pairs.csv")
            page.click("#tune")
            expect(page.locator("#error")).to_contain_text("needs the role 'admin'")
            expect(page.locator("#key-form")).to_be_hidden()

            # forget the key: gone from the tab, and the page asks again
            page.click("#forget-key")
            expect(page.locator("#key-form")).to_be_visible()
            assert page.evaluate("sessionStorage.getItem('cliptuner.key')") is None
            assert not errors, errors
        finally:
            browser.close()
