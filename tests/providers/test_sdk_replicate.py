"""The official `replicate` SDK (1.0.7) against ReplicateFake: if the fake drifts from the
real protocol (paths, prediction fields, statuses, problem bodies, webhook signatures),
these fail."""

from __future__ import annotations

import contextlib
import io
import json
import time
from collections.abc import Iterator

import httpx
import pytest
from PIL import Image as PILImage
from replicate.client import Client
from replicate.exceptions import ModelError, ReplicateError
from replicate.helpers import FileOutput
from replicate.prediction import Prediction
from replicate.webhook import InvalidSignatureError, Webhooks
from standardwebhooks.webhooks import Webhook

from imagegraph.testing.fakes.replicate import ReplicateFake, version_of
from imagegraph.testing.fakes.server import Fault
from tests.receiver import Receiver

FLUX_DEV = "black-forest-labs/flux-dev"
FLUX_PRO = "black-forest-labs/flux-1.1-pro"
SMALL = {"prompt": "a fox", "megapixels": "0.25"}  # a 496x496 image


@contextlib.contextmanager
def sdk_client(fake: ReplicateFake, token: str) -> Iterator[Client]:
    """An SDK client of the fake, its connections closed afterwards."""
    transport = httpx.HTTPTransport()
    client = Client(api_token=token, base_url=fake.url, transport=transport)
    client.poll_interval = 0.05
    try:
        yield client
    finally:
        transport.close()


def picture(client: Client, url: str) -> PILImage.Image:
    """An output, downloaded the SDK's way."""
    return PILImage.open(io.BytesIO(FileOutput(url, client).read()))


@pytest.fixture(scope="module")
def server() -> Iterator[ReplicateFake]:
    with ReplicateFake() as fake:
        assert isinstance(fake, ReplicateFake)
        yield fake


@pytest.fixture
def fake(server: ReplicateFake) -> ReplicateFake:
    """The module's fake, as new: no faults, a short latency, counters at zero."""
    server.reset()
    server.latency = 0.2
    return server


@pytest.fixture
def client(fake: ReplicateFake) -> Iterator[Client]:
    with sdk_client(fake, fake.api_key) as client:
        yield client


def test_sdk_creates_a_prediction_for_a_model_and_waits(
    client: Client, fake: ReplicateFake
) -> None:
    prediction = client.predictions.create(
        model=FLUX_DEV, input={**SMALL, "num_outputs": 2, "output_format": "png", "seed": 7}
    )

    statuses = [prediction.status]
    assert prediction.urls is not None
    assert prediction.urls["get"] == f"{fake.url}/v1/predictions/{prediction.id}"
    prediction.wait()
    statuses.append(prediction.status)

    assert statuses == ["starting", "succeeded"]
    assert (prediction.model, prediction.version) == (FLUX_DEV, version_of(FLUX_DEV))
    assert prediction.input is not None
    assert prediction.input["seed"] == 7
    assert prediction.logs is not None
    assert "Using seed: 7" in prediction.logs
    assert prediction.progress is not None
    assert prediction.progress.percentage == 1.0  # the SDK reads the progress bar in logs
    assert prediction.metrics == {"predict_time": 0.1, "total_time": 0.2}
    assert isinstance(prediction.output, list)
    assert len(prediction.output) == 2
    for url in prediction.output:
        image = picture(client, url)
        assert (image.format, image.size) == ("PNG", (496, 496))
    assert fake.accepted == 1


@pytest.mark.parametrize(
    "version",
    [version_of(FLUX_PRO), f"{FLUX_PRO}:{version_of(FLUX_PRO)}"],
    ids=["bare-id", "owner-name-id"],
)
def test_sdk_creates_a_prediction_for_a_version_and_reloads(
    client: Client, fake: ReplicateFake, version: str
) -> None:
    fake.latency = 0.6  # processing from 0.3 s
    prediction = client.predictions.create(version=version, input=SMALL)
    seen = [prediction.status]
    deadline = time.monotonic() + 5
    while prediction.status not in ("succeeded", "failed", "canceled"):
        assert time.monotonic() < deadline, f"still {prediction.status}"
        time.sleep(0.03)
        prediction.reload()
        seen.append(prediction.status)

    assert seen[0] == "starting"
    assert "processing" in seen
    assert seen[-1] == "succeeded"
    assert prediction.model == FLUX_PRO
    assert prediction.completed_at is not None
    assert isinstance(prediction.output, str)  # FLUX1.1 [pro] answers one URL
    assert picture(client, prediction.output).format == "WEBP"  # the model's default
    assert fake.jobs[prediction.id]["model"] == FLUX_PRO


def test_sdk_run_blocks_until_the_output(client: Client, fake: ReplicateFake) -> None:
    for _ in range(3):  # `Prefer: wait` answers the finished prediction, every time
        output = client.run(FLUX_PRO, input={**SMALL, "output_format": "jpg"})

        assert isinstance(output, str)
        assert picture(client, output).format == "JPEG"
    assert fake.requests["status"] == 0  # nothing left to poll


def test_sdk_run_polls_a_prediction_still_running_when_the_wait_ends(
    client: Client, fake: ReplicateFake
) -> None:
    fake.latency = 1.5  # processing from 0.75 s, done at 1.5 s

    # The blocking create gives up after 1 s and answers the prediction `starting`: `run`
    # polls it then (any other status it would take as finished, output and all).
    output = client.run(FLUX_DEV, input=SMALL, wait=1)

    assert isinstance(output, list)
    assert [picture(client, url).size for url in output] == [(496, 496)]
    assert fake.requests["status"] >= 1


def test_sdk_cancels_a_prediction(client: Client, fake: ReplicateFake) -> None:
    fake.latency = 5.0
    prediction = client.predictions.create(model=FLUX_DEV, input=SMALL)

    prediction.cancel()

    assert prediction.status == "canceled"
    assert client.predictions.get(prediction.id).status == "canceled"
    assert fake.cancelled == 1
    client.predictions.cancel(prediction.id)  # already canceled: answered, not counted again
    assert fake.cancelled == 1


def test_sdk_raises_model_error_for_a_failed_prediction(client: Client) -> None:
    with pytest.raises(ModelError) as caught:
        client.run(FLUX_DEV, input={**SMALL, "prompt": "something forbidden"})

    assert caught.value.prediction.status == "failed"
    assert caught.value.prediction.error is not None
    assert "flagged as sensitive" in caught.value.prediction.error


def test_sdk_reads_the_problem_details_of_errors(client: Client, fake: ReplicateFake) -> None:
    with pytest.raises(ReplicateError) as invalid:
        client.predictions.create(model=FLUX_DEV, input={"seed": 1})
    with pytest.raises(ReplicateError) as unknown_version:
        client.predictions.create(version="0" * 64, input=SMALL)
    with pytest.raises(ReplicateError) as missing:
        client.predictions.get("nosuchprediction")
    with sdk_client(fake, "wrong") as stranger, pytest.raises(ReplicateError) as unauthenticated:
        stranger.predictions.create(model=FLUX_DEV, input=SMALL)

    assert (invalid.value.status, invalid.value.title) == (422, "Input validation failed")
    assert invalid.value.detail is not None
    assert "prompt is required" in invalid.value.detail
    assert (unknown_version.value.status, unknown_version.value.title) == (
        422,
        "Invalid version or not permitted",
    )
    assert (missing.value.status, missing.value.title) == (404, "Not found")
    assert (unauthenticated.value.status, unauthenticated.value.title) == (401, "Unauthenticated")
    assert unauthenticated.value.detail == "You did not pass a valid authentication token"
    assert fake.accepted == 0


def test_sdk_reads_a_throttled_create(client: Client, fake: ReplicateFake) -> None:
    detail = "Request was throttled. Your rate limit resets in ~30s."
    body = {"detail": detail, "status": 429}
    fake.faults.add("submit", Fault(status=429, body=body, headers={"Retry-After": "30"}))

    with pytest.raises(ReplicateError) as caught:  # the SDK never retries a POST
        client.predictions.create(model=FLUX_DEV, input=SMALL)

    assert (caught.value.status, caught.value.detail) == (429, detail)


def test_sdk_retries_a_read_the_fake_turned_away(client: Client, fake: ReplicateFake) -> None:
    prediction = client.predictions.create(model=FLUX_DEV, input=SMALL)
    fake.faults.add(
        "status",
        Fault(status=503, body={"detail": "Service Unavailable"}, headers={"Retry-After": "0"}),
    )

    assert client.predictions.get(prediction.id).id == prediction.id
    assert fake.requests["status"] == 2


def test_the_webhook_verifies_with_the_sdk_and_standard_webhooks(
    client: Client, fake: ReplicateFake
) -> None:
    secret = client.webhooks.default.secret()
    assert secret.key == fake.webhook_secret
    with Receiver() as receiver:
        receiver.secret = secret.key
        prediction = client.predictions.create(
            model=FLUX_DEV,
            input=SMALL,
            webhook=receiver.url,
            webhook_events_filter=["completed"],
        )
        [delivery] = receiver.wait_for(1)

    body = delivery.body.decode()
    Webhooks.validate(headers=delivery.headers, body=body, secret=secret, tolerance=300)
    payload = Webhook(secret.key).verify(delivery.body, delivery.headers)
    assert delivery.verified == payload  # as the receiver checked it on arrival
    delivered = Prediction(**payload)  # the body is a prediction, as the SDK parses one
    assert (delivered.id, delivered.status) == (prediction.id, "succeeded")
    assert delivered.output == fake.jobs[prediction.id]["output"]

    tampered = json.dumps({**json.loads(body), "status": "failed"})
    with pytest.raises(InvalidSignatureError):
        Webhooks.validate(headers=delivery.headers, body=tampered, secret=secret)
