"""BflAdapter against BflFake: the fields it sends, how it reads every answer, where its
key goes."""

from __future__ import annotations

import base64
import contextlib
import dataclasses
import io
import json
from collections.abc import Iterator
from typing import Any
from urllib.parse import parse_qs, urlsplit

import httpx
import pytest
from PIL import Image as PILImage

from imagegraph.errors import NodeError, TransientNodeError
from imagegraph.providers.base import (
    Job,
    Pending,
    ProviderConfig,
    ProviderError,
    Request,
    Result,
    Route,
    SourceImage,
)
from imagegraph.providers.bfl import BflAdapter
from imagegraph.providers.hub import ProviderHub
from imagegraph.settings import Settings
from imagegraph.testing.fakes.bfl import BflFake
from imagegraph.testing.fakes.server import Fault
from tests.providers.jobs import finish, refused, started

FLUX_PRO = Route("bfl", "flux-pro-1.1", options={"size": "width_height"})
FLUX_DEV = Route("bfl", "flux-dev", options={"size": "width_height"})
FLUX_2_PRO = Route("bfl", "flux-2-pro", options={"size": "width_height"})
FLUX_2_FLEX = Route("bfl", "flux-2-flex", options={"size": "width_height"})


def small(prompt: str = "a fox", **changes: Any) -> Request:
    """A quick request: a small image of `prompt`."""
    return dataclasses.replace(Request(prompt=prompt, width=256, height=256), **changes)


def source_image(width: int = 48, height: int = 32) -> SourceImage:
    buffer = io.BytesIO()
    PILImage.new("RGB", (width, height), (200, 40, 40)).save(buffer, "PNG")
    return SourceImage(buffer.getvalue(), "image/png", width, height)


@pytest.fixture(scope="module")
def server() -> Iterator[BflFake]:
    fake = BflFake()
    fake.start()
    yield fake
    fake.stop()


@pytest.fixture
def fake(server: BflFake) -> BflFake:
    """The module's fake, as new: no faults, no latency, counters at zero."""
    server.reset()
    server.region = "us1"
    return server


@pytest.fixture
def adapter(fake: BflFake, http: httpx.AsyncClient) -> BflAdapter:
    return BflAdapter(ProviderConfig("bfl", fake.api_key, fake.url), http)


def polls(fake: BflFake) -> list[dict[str, Any]]:
    return [entry for entry in fake.received if entry["endpoint"] == "status"]


# -- what is sent ------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("route", "request_", "sent"),
    [
        (
            FLUX_PRO,
            Request(
                prompt="a red fox",
                width=512,
                height=384,
                seed=7,
                output_format="png",
                safety_tolerance=6,
            ),
            {
                "prompt": "a red fox",
                "width": 512,
                "height": 384,
                "seed": 7,
                "output_format": "png",
                "safety_tolerance": 6,
            },
        ),
        (
            FLUX_DEV,
            Request(prompt="a red fox", steps=20, guidance=3.5, extra={"prompt_upsampling": True}),
            {"prompt": "a red fox", "steps": 20, "guidance": 3.5, "prompt_upsampling": True},
        ),
        (
            FLUX_2_PRO,
            Request(prompt="a red fox", width=320, height=192, safety_tolerance=5),
            {"prompt": "a red fox", "width": 320, "height": 192, "safety_tolerance": 5},
        ),
        (
            FLUX_2_FLEX,
            Request(prompt="a red fox", steps=30, guidance=5.0, output_format="webp"),
            {"prompt": "a red fox", "steps": 30, "guidance": 5.0, "output_format": "webp"},
        ),
    ],
    ids=["flux-pro-1.1", "flux-dev", "flux-2-pro", "flux-2-flex"],
)
async def test_start_sends_the_fields_the_model_takes(
    adapter: BflAdapter, fake: BflFake, route: Route, request_: Request, sent: dict[str, object]
) -> None:
    job = await started(adapter, route, request_)

    received = fake.jobs[job.id]
    assert received["input"] == sent
    assert received["model"] == route.model
    assert received["headers"]["x-key"] == fake.api_key


async def test_flux_2_gets_the_image_as_raw_base64(adapter: BflAdapter, fake: BflFake) -> None:
    image = source_image(48, 32)

    job = await started(adapter, FLUX_2_PRO, Request(prompt="at night", image=image))

    sent = fake.jobs[job.id]["input"]
    assert sent["input_image"] == base64.b64encode(image.data).decode()  # not a data URI
    result = await finish(adapter, job)
    assert result.images[0].url is not None
    assert result.details["input_mp"] == 0.0  # 48x32 is 0.0015 MP, rounded as BFL rounds
    assert result.cost == 4.5  # 3 for the first megapixel out, 1.5 for the one started in


@pytest.mark.parametrize(
    ("route", "request_", "param"),
    [
        (FLUX_PRO, small(negative_prompt="blurry"), "negative_prompt"),
        (FLUX_2_PRO, small(negative_prompt="blurry"), "negative_prompt"),
        (FLUX_PRO, small(steps=20), "steps"),
        (FLUX_PRO, small(guidance=3.0), "guidance"),
        (FLUX_2_PRO, small(steps=20), "steps"),
        (FLUX_DEV, small(num_images=2), "num_images"),
        (FLUX_2_PRO, small(safety_tolerance=6), "safety_tolerance"),
        (FLUX_PRO, small(image=source_image()), "image"),
        (FLUX_2_PRO, small(image=source_image(), mask=source_image()), "mask"),
        (FLUX_DEV, small(scale=2), "scale"),
    ],
)
async def test_a_parameter_the_model_does_not_take_is_refused_by_name(
    adapter: BflAdapter, fake: BflFake, route: Route, request_: Request, param: str
) -> None:
    with pytest.raises(ProviderError) as caught:
        await adapter.start(route, request_)

    assert caught.value.kind == "bad_request"
    assert param in caught.value.message
    assert route.model in caught.value.message
    assert fake.requests["submit"] == 0


async def test_a_size_the_route_cannot_send_is_refused(adapter: BflAdapter, fake: BflFake) -> None:
    route = dataclasses.replace(FLUX_2_PRO, options={"size": "aspect_ratio"})

    with pytest.raises(ProviderError) as caught:
        await adapter.start(route, small())

    assert caught.value.kind == "bad_request"
    assert "'aspect_ratio'" in caught.value.message
    assert fake.requests["submit"] == 0


@pytest.mark.parametrize(
    ("route", "request_", "field", "msg"),
    [
        (FLUX_PRO, small(width=1000), "width", "multiple of 32"),
        (FLUX_PRO, small(width=128, height=1536), "width", "greater than or equal to 256"),
        (FLUX_DEV, small(steps=60), "steps", "less than or equal to 50"),
        (FLUX_DEV, small(guidance=7.0), "guidance", "less than or equal to 5"),
        (FLUX_2_PRO, small(width=32), "width", "greater than or equal to 64"),
        (FLUX_2_PRO, Request(width=256, height=256), "prompt", "Field required"),
        (FLUX_2_PRO, small(extra={"output_format": "gif"}), "output_format", "'jpeg'"),
    ],
)
async def test_what_bfl_refuses_is_a_bad_request_naming_the_field(
    adapter: BflAdapter, fake: BflFake, route: Route, request_: Request, field: str, msg: str
) -> None:
    with pytest.raises(ProviderError) as caught:
        await adapter.start(route, request_)

    assert (caught.value.kind, caught.value.status) == ("bad_request", 422)
    assert caught.value.message.startswith(f"{field}: ")
    assert msg in caught.value.message
    assert fake.requests["submit"] == 1
    assert fake.accepted == 0


async def test_an_unknown_model_is_not_found(adapter: BflAdapter, fake: BflFake) -> None:
    with pytest.raises(ProviderError) as caught:
        await adapter.start(Route("bfl", "flux-9-ultra"), small())

    assert (caught.value.kind, caught.value.status) == ("not_found", 404)
    assert fake.accepted == 0


# -- results -----------------------------------------------------------------------------


async def test_pending_then_a_result_with_a_downloadable_image(
    adapter: BflAdapter, fake: BflFake, http: httpx.AsyncClient
) -> None:
    fake.latency = 5.0
    job = await started(adapter, FLUX_PRO, small(seed=7, output_format="png"))

    pending = await adapter.poll(job)
    assert isinstance(pending, Pending)
    assert pending.status == "Pending"
    assert pending.progress is not None
    assert 0.0 <= pending.progress < 0.5
    fake.latency = 0.3
    result = await finish(adapter, job)

    assert len(result.images) == 1
    assert result.seed == 7
    assert result.request_id == job.id
    assert (result.cost, result.cost_unit) == (4.0, "credits")
    assert result.details == {"duration": 0.3, "input_mp": 0.0, "output_mp": 0.07}
    image = result.images[0]
    assert image.url is not None
    assert image.mime_type == "image/png"
    download = await http.get(image.url)
    assert download.status_code == 200
    assert download.headers["content-type"] == "image/png"
    assert PILImage.open(io.BytesIO(download.content)).size == (256, 256)
    assert fake.accepted == 1


async def test_the_cost_survives_a_resumed_job(adapter: BflAdapter, fake: BflFake) -> None:
    job = await started(
        adapter,
        FLUX_2_PRO,
        Request(prompt="a fox", width=1536, height=1024, image=source_image(1024, 1024)),
    )
    resumed = Job.from_json(json.loads(json.dumps(job.to_json())))

    result = await finish(adapter, resumed)

    # The first megapixel out (3), the second started (1.5), the megapixel in (1.5).
    assert result.cost == 6.0
    assert result.details["input_mp"] == 1.05
    assert result.details["output_mp"] == 1.57
    assert result.images[0].mime_type == "image/jpeg"  # BFL's default format


async def test_the_polling_url_is_the_one_bfl_returned(adapter: BflAdapter, fake: BflFake) -> None:
    fake.region = "eu4"
    job = await started(adapter, FLUX_PRO, small())

    assert job.urls == {"polling": f"{fake.url}/eu4/v1/get_result?id={job.id}"}
    await finish(adapter, job)

    assert polls(fake)
    for poll in polls(fake):
        assert (poll["path"], poll["query"]) == ("/eu4/v1/get_result", {"id": job.id})


async def test_a_moderated_request_is_content_blocked(adapter: BflAdapter, fake: BflFake) -> None:
    fake.latency = 5.0  # the input is refused at once, long before the task would end
    error = await refused(adapter, FLUX_PRO, small("something forbidden"))

    assert error.kind == "content_blocked"
    assert error.provider_code == "Request Moderated"
    assert "Moderation Reasons" in error.message
    assert error.request_id is not None


async def test_moderated_content_is_content_blocked(adapter: BflAdapter) -> None:
    error = await refused(adapter, FLUX_2_PRO, small("nsfw fox"))

    assert error.kind == "content_blocked"
    assert error.provider_code == "Content Moderated"


async def test_a_task_ended_in_error_failed(adapter: BflAdapter) -> None:
    error = await refused(adapter, FLUX_PRO, small("explode"))

    assert error.kind == "failed"
    assert error.provider_code == "Error"
    assert "Internal error" in error.message


async def test_an_input_image_that_does_not_decode_failed(
    adapter: BflAdapter, fake: BflFake
) -> None:
    broken = SourceImage(b"not a picture", "image/png", 8, 8)

    error = await refused(adapter, FLUX_2_PRO, Request(prompt="a fox", image=broken))

    assert error.kind == "failed"
    assert "input_image" in error.message
    assert fake.accepted == 1  # BFL took (and charged for) the task


@pytest.mark.parametrize("status", [404, 200])
async def test_an_unknown_task_is_not_found(
    adapter: BflAdapter, fake: BflFake, status: int
) -> None:
    job = Job("bfl", "flux-pro-1.1", "gone", urls={"polling": fake.polling_url("gone")})
    if status == 200:  # the HTTP status BFL sends with it is unconfirmed: both are read
        body = {"id": "gone", "status": "Task not found"}
        fake.faults.add("status", Fault(status=200, body=body))

    with pytest.raises(ProviderError) as caught:
        await adapter.poll(job)

    assert caught.value.kind == "not_found"
    assert caught.value.request_id == "gone"


@pytest.mark.parametrize(
    "body",
    [
        {"id": "x", "status": "Sleeping"},
        {"id": "x", "status": "Ready", "result": {"seed": 1}},
        {"id": "x", "status": "Ready", "result": {"sample": "ftp://example.com/x.png"}},
        ["Pending"],
    ],
    ids=["unknown-status", "no-sample", "sample-not-http", "not-an-object"],
)
async def test_an_answer_the_protocol_does_not_allow_is_malformed(
    adapter: BflAdapter, fake: BflFake, body: Any
) -> None:
    job = await started(adapter, FLUX_PRO, small())
    fake.faults.add("status", Fault(status=200, body=body))

    with pytest.raises(ProviderError) as caught:
        await adapter.poll(job)
    assert caught.value.kind == "malformed"


# -- HTTP failures -----------------------------------------------------------------------


@pytest.mark.parametrize(
    ("status", "kind"),
    [
        (402, "payment_required"),
        (429, "rate_limited"),
        (500, "unavailable"),
        (503, "unavailable"),
    ],
)
async def test_submit_errors_by_status(
    adapter: BflAdapter, fake: BflFake, status: int, kind: str
) -> None:
    fake.faults.add(
        "submit", Fault(status=status, body={"detail": "Nope"}, headers={"Retry-After": "7"})
    )

    with pytest.raises(ProviderError) as caught:
        await adapter.start(FLUX_PRO, small())

    assert (caught.value.kind, caught.value.status) == (kind, status)
    assert caught.value.message == "Nope"
    assert caught.value.retry_after == 7.0
    assert fake.accepted == 0


@pytest.mark.parametrize("status", [500, 502, 503])
async def test_polling_server_errors_are_unavailable(
    adapter: BflAdapter, fake: BflFake, status: int
) -> None:
    job = await started(adapter, FLUX_PRO, small())
    fake.faults.add("status", Fault(status=status, body=b"upstream connect error"))

    with pytest.raises(ProviderError) as caught:
        await adapter.poll(job)
    assert caught.value.kind == "unavailable"
    assert isinstance(await adapter.poll(job), Result)  # the next poll goes through


async def test_a_body_that_is_not_json_is_malformed(adapter: BflAdapter, fake: BflFake) -> None:
    job = await started(adapter, FLUX_PRO, small())
    fake.faults.add("submit", Fault(malformed=True))
    fake.faults.add("status", Fault(malformed=True))

    with pytest.raises(ProviderError) as submitted:
        await adapter.start(FLUX_PRO, small())
    with pytest.raises(ProviderError) as polled:
        await adapter.poll(job)

    assert submitted.value.kind == polled.value.kind == "malformed"


@pytest.mark.parametrize(
    "body",
    [{"id": "abc"}, {"id": "abc", "polling_url": "/v1/get_result?id=abc"}, {"polling_url": "x"}],
    ids=["no-polling-url", "relative-polling-url", "no-id"],
)
async def test_a_submit_answer_without_id_or_polling_url_is_malformed(
    adapter: BflAdapter, fake: BflFake, body: dict[str, str]
) -> None:
    fake.faults.add("submit", Fault(status=200, body=body))

    with pytest.raises(ProviderError) as caught:
        await adapter.start(FLUX_PRO, small())
    assert caught.value.kind == "malformed"


async def test_no_answer_in_time_is_a_timeout(fake: BflFake) -> None:
    fake.faults.add("status", Fault(hang=True))
    async with httpx.AsyncClient(timeout=0.3) as http:
        adapter = BflAdapter(ProviderConfig("bfl", fake.api_key, fake.url), http)
        job = await started(adapter, FLUX_PRO, small())

        with pytest.raises(ProviderError) as caught:
            await adapter.poll(job)
    assert caught.value.kind == "timeout"


async def test_a_refused_connection_is_unavailable(http: httpx.AsyncClient) -> None:
    adapter = BflAdapter(ProviderConfig("bfl", "key", "http://127.0.0.1:1"), http)

    with pytest.raises(ProviderError) as caught:
        await adapter.start(FLUX_PRO, small())
    assert caught.value.kind == "unavailable"


@pytest.mark.parametrize(
    ("key", "detail"),
    [("wrong", "Not authenticated - Invalid Authentication"), (None, "Not authenticated")],
    ids=["wrong-key", "no-key"],
)
async def test_a_wrong_or_missing_key_is_unauthorized(
    fake: BflFake, http: httpx.AsyncClient, key: str | None, detail: str
) -> None:
    adapter = BflAdapter(ProviderConfig("bfl", key, fake.url), http)

    with pytest.raises(ProviderError) as caught:
        await adapter.start(FLUX_PRO, small())

    assert (caught.value.kind, caught.value.status) == ("unauthorized", 403)
    assert caught.value.message == detail
    assert fake.accepted == 0


# -- result URLs -------------------------------------------------------------------------


async def test_an_expired_or_altered_result_url_answers_403(
    adapter: BflAdapter, fake: BflFake, http: httpx.AsyncClient
) -> None:
    result = await finish(adapter, await started(adapter, FLUX_PRO, small()))
    url = result.images[0].url
    assert url is not None
    query = parse_qs(urlsplit(url).query)
    assert set(query) >= {"se", "sig"}  # signed, with its expiry
    assert (await http.get(url)).status_code == 200

    assert (await http.get(url.replace("sig=", "sig=x"))).status_code == 403
    fake.expire_after = 0.0
    assert (await http.get(url)).status_code == 403


async def test_an_expired_result_is_a_download_failure_not_worth_retrying(
    fake: BflFake,
) -> None:
    # The hub downloads results (the catalog node turns this failure into result_expired).
    hub = ProviderHub(Settings(bfl_api_key=fake.api_key, bfl_base_url=fake.url))
    try:
        adapter = hub.adapter("bfl")
        job = await adapter.start(FLUX_PRO, small(output_format="png"))
        assert isinstance(job, Job)
        result = await finish(adapter, job)
        url = result.images[0].url
        assert url is not None
        assert PILImage.open(io.BytesIO(await hub.download("bfl", url))).format == "PNG"

        fake.expire_after = 0.0
        with pytest.raises(NodeError) as caught:
            await hub.download("bfl", url)
        assert not isinstance(caught.value, TransientNodeError)
        assert caught.value.code == "fetch_failed"
        assert "HTTP 403" in str(caught.value)
    finally:
        await hub.aclose()


# -- where the key goes ------------------------------------------------------------------


async def test_the_key_goes_with_polls_on_the_configured_host_only(
    adapter: BflAdapter, fake: BflFake
) -> None:
    job = await started(adapter, FLUX_PRO, small())
    await adapter.poll(job)
    elsewhere = job.urls["polling"].replace("127.0.0.1", "localhost")

    # BFL's polling needs no key, so the poll on another host still answers.
    outcome = await adapter.poll(Job(job.provider, job.model, job.id, urls={"polling": elsewhere}))

    assert isinstance(outcome, Result)
    same_host, other_host = polls(fake)
    assert same_host["headers"]["x-key"] == fake.api_key
    assert "x-key" not in other_host["headers"]


@pytest.mark.parametrize(
    ("polling_url", "keyed"),
    [
        ("https://api.bfl.ai/v1/get_result?id=t1", True),
        ("https://api.us1.bfl.ai/v1/get_result?id=t1", True),
        ("https://api.eu.bfl.ai/v1/get_result?id=t1", True),
        ("http://api.bfl.ai/v1/get_result?id=t1", False),
        ("http://api.us1.bfl.ai/v1/get_result?id=t1", False),
        ("https://api.bfl.ai.example.com/v1/get_result?id=t1", False),
        ("https://notbfl.ai/v1/get_result?id=t1", False),
        ("https://bfl.ml/v1/get_result?id=t1", False),
    ],
)
async def test_the_key_goes_only_to_bfl_hosts_over_https(polling_url: str, keyed: bool) -> None:
    seen: list[httpx.Request] = []

    def answer(request: httpx.Request) -> httpx.Response:
        seen.append(request)
        return httpx.Response(200, json={"id": "t1", "status": "Pending", "progress": 0.5})

    async with httpx.AsyncClient(transport=httpx.MockTransport(answer)) as http:
        adapter = BflAdapter(ProviderConfig("bfl", "secret-key", "https://api.bfl.ai"), http)
        outcome = await adapter.poll(Job("bfl", "flux-2-pro", "t1", urls={"polling": polling_url}))

    assert outcome == Pending("Pending", 0.5)
    assert [str(request.url) for request in seen] == [polling_url]
    assert ("x-key" in seen[0].headers) is keyed
    if keyed:
        assert seen[0].headers["x-key"] == "secret-key"


# -- no cancel, no webhooks --------------------------------------------------------------


async def test_there_is_no_cancel(adapter: BflAdapter, fake: BflFake) -> None:
    fake.latency = 0.2
    job = await started(adapter, FLUX_PRO, small())
    sent = sum(fake.requests.values())

    assert not adapter.supports_cancel
    await adapter.cancel(job)  # nothing to call: a no-op

    assert sum(fake.requests.values()) == sent
    assert fake.cancelled == 0
    assert isinstance(await finish(adapter, job), Result)  # the task ran on, and is paid


async def test_there_are_no_webhooks(adapter: BflAdapter, fake: BflFake) -> None:
    job = await adapter.start(FLUX_PRO, small(), webhook_url="https://hooks.example.com/bfl")

    assert isinstance(job, Job)  # polled, as ever
    assert not adapter.supports_webhook
    assert "webhook_url" not in fake.jobs[job.id]["input"]
    with pytest.raises(ProviderError) as caught:
        await adapter.verify_webhook({}, b"{}")
    assert caught.value.kind == "bad_request"


# -- accounting --------------------------------------------------------------------------


async def test_accepted_jobs_are_the_starts_that_got_a_job(
    adapter: BflAdapter, fake: BflFake
) -> None:
    fake.faults.add("submit", Fault(status=503, body={"detail": "busy"}))
    outcomes = []
    for request in (
        small(),  # 503
        small(),
        small(negative_prompt="no"),  # refused before sending
        small(width=1000),  # refused by BFL (422)
        small("something forbidden"),  # accepted, then moderated
    ):
        with contextlib.suppress(ProviderError):
            outcomes.append(await adapter.start(FLUX_PRO, request))

    assert fake.accepted == len([job for job in outcomes if isinstance(job, Job)]) == 2
    assert fake.requests["submit"] == 4
