"""secure_ai.workers: real syft 0.9.5 datasites, started and stopped for each test module."""
import numpy as np
import pytest
from secure_ai import workers
from secure_ai.workers import DataOwner, RemoteError, call, sy

EMAIL, PASSWORD = "ds@example.org", "s3cret"


@pytest.fixture(scope="module")
def joe():
    owner = DataOwner("joe")
    owner.upload_dataset("numbers", private={"x": np.arange(6.0)}, mock={"x": np.zeros(6)})
    owner.add_data_scientist(EMAIL, PASSWORD)
    yield owner
    owner.shutdown()


@pytest.fixture(scope="module")
def ds(joe):
    return joe.login(EMAIL, PASSWORD)


def test_owner_is_registered_and_found_by_name(joe):
    assert joe.is_running and "joe" in workers.running_owners()
    assert workers.get_owner("joe") is joe
    assert joe.url is None and "in memory" in repr(joe)


def test_unknown_owner_name_is_a_clear_error(joe):
    with pytest.raises(ValueError, match="unknown data owner 'bob'; running owners: .*joe"):
        workers.get_owner("bob")


@pytest.mark.parametrize("name", ["", "two words", "x" * 41, 7, "../etc"])
def test_bad_owner_names_are_rejected(name):
    with pytest.raises(ValueError, match="owner name"):
        DataOwner(name)


def test_bad_port_is_rejected():
    with pytest.raises(ValueError, match="port"):
        DataOwner("portless", port=80)


def test_data_scientist_sees_the_mock_not_the_private_data(joe, ds):
    asset = ds.datasets["numbers"].assets["x"]
    assert np.array_equal(asset.mock, np.zeros(6))
    with workers.quiet():
        assert asset.data is None  # syft refuses: no permission
    assert np.array_equal(joe.client.datasets["numbers"].assets["x"].data, np.arange(6.0))


@pytest.mark.parametrize(
    "private, mock, message",
    [
        ({"x": np.zeros(3)}, {"y": np.zeros(3)}, "same asset names"),
        ({}, {}, "same asset names"),
        ({"x": np.zeros((3, 2))}, {"x": np.zeros((3, 5))}, "per-sample shape"),
        ({"x": np.zeros(3, dtype=np.uint8)}, {"x": np.zeros(3)}, "dtype"),
    ],
)
def test_upload_rejects_a_mock_that_does_not_match(joe, private, mock, message):
    with pytest.raises(ValueError, match=message):
        joe.upload_dataset("bad", private=private, mock=mock)


def test_add_data_scientist_validates_and_reports_duplicates(joe):
    with pytest.raises(ValueError, match="email"):
        joe.add_data_scientist("not-an-email", "pw")
    with pytest.raises(ValueError, match="could not create"):
        joe.add_data_scientist(EMAIL, "another")


def test_approved_request_runs_at_most_the_approved_number_of_times(joe, ds):
    from syft.service.policy.policy import OutputPolicyExecuteCount

    asset = ds.datasets["numbers"].assets["x"]

    def total_plus(x, k):
        return float(x.sum()) + k

    with workers.quiet():
        function = sy.syft_function(
            input_policy=sy.MixedInputPolicy(client=ds, x=asset, k=int),
            output_policy=OutputPolicyExecuteCount(limit=2),
        )(total_plus)
        ds.code.request_code_execution(function)
    assert [r.code.service_func_name for r in joe.pending_requests()] == ["total_plus"]
    review = joe.code_of("total_plus")
    assert "float(x.sum()) + k" in review and "at most 2 runs" in review
    assert "x = asset numbers/x" in review and "k = any int of the data scientist's" in review
    with pytest.raises(RemoteError, match="not reviewed this request yet|waiting for approval"):
        call(ds.code.total_plus, x=asset, k=1)
    joe.approve("total_plus")
    assert call(ds.code.total_plus, x=asset, k=1) == 16.0
    assert call(ds.code.total_plus, x=asset, k=2) == 17.0
    with pytest.raises(RemoteError, match="used up"):
        call(ds.code.total_plus, x=asset, k=3)
    assert joe.runs("total_plus") == 2


def test_denied_request_never_runs(joe, ds):
    asset = ds.datasets["numbers"].assets["x"]

    def leak(x):
        return x

    with workers.quiet():
        ds.code.request_code_execution(sy.syft_function_single_use(x=asset)(leak))
    joe.deny("leak", reason="returns the raw data")
    with pytest.raises(RemoteError, match="returns the raw data") as info:
        call(ds.code.leak, x=asset)
    assert "<class" not in str(info.value)
    assert joe.runs("leak") == 0


def _request(ds, function, limit=1, **inputs):
    from syft.service.policy.policy import OutputPolicyExecuteCount

    with workers.quiet():
        submitted = sy.syft_function(input_policy=sy.MixedInputPolicy(client=ds, **inputs),
                                     output_policy=OutputPolicyExecuteCount(limit=limit))(function)
        ds.code.request_code_execution(submitted)


def test_a_request_carrying_a_hidden_second_function_is_refused(joe, ds):
    """Malicious data scientist: one request, two code changes; the owner would read only the first."""
    from syft.service.code.user_code import UserCodeStatus
    from syft.service.request.request import SubmitRequest, UserCodeStatusChange
    from syft.store.linked_obj import LinkedObject

    asset = ds.datasets["numbers"].assets["x"]

    def harmless_sum(x):
        return float(x.sum())

    def hidden_copy(x):
        return x

    with workers.quiet():
        for function in (harmless_sum, hidden_copy):  # syft's guest endpoints: code.submit, request.submit
            ds.code.submit(sy.syft_function_single_use(x=asset)(function))
        codes = {c.service_func_name: c for c in ds.code.get_all()}
        ds.api.services.request.submit(SubmitRequest(changes=[
            UserCodeStatusChange(value=UserCodeStatus.APPROVED, linked_obj=codes[n].status_link,
                                 linked_user_code=LinkedObject.from_obj(codes[n], server_uid=ds.id))
            for n in ("harmless_sum", "hidden_copy")
        ]))
    with pytest.raises(ValueError, match="carries 2 changes"):
        joe.code_of("harmless_sum")
    with pytest.raises(ValueError, match="carries 2 changes"):
        joe.approve("harmless_sum", digest="0" * 64)
    with pytest.raises(RemoteError, match="not reviewed this request yet|waiting for approval"):
        call(ds.code.hidden_copy, x=asset)  # the hidden function never ran on the private data
    joe.deny("harmless_sum", reason="one function per request")
    assert joe.runs("hidden_copy") == 0 and not joe.pending_requests()


def test_approval_is_bound_to_the_reviewed_request_and_code(joe, ds):
    """Malicious data scientist swaps the code between the owner's review and the approval."""
    asset = ds.datasets["numbers"].assets["x"]

    def mean_of(x):
        return float(x.mean())

    _request(ds, mean_of, x=asset)
    with pytest.raises(ValueError, match="has not reviewed 'mean_of'"):
        joe.approve("mean_of")  # approving unseen code is refused
    review = joe.code_of("mean_of")
    assert len(review.digest) == 64 and review.request_id == str(joe.pending_requests()[0].id)

    # Swap 1: a second pending request under the same name, holding other code.
    def mean_of(x):  # noqa: F811
        return x

    _request(ds, mean_of, x=asset)
    with pytest.raises(ValueError, match="2 pending requests for a function named 'mean_of'"):
        joe.approve("mean_of")
    joe.deny("mean_of", reason="two requests of the same name")
    assert joe.runs("mean_of") == 0

    # Swap 2: the reviewed request is gone and a new one of the same name is pending.
    def mean_of(x):  # noqa: F811
        return x[:3]

    _request(ds, mean_of, x=asset)
    with pytest.raises(ValueError, match="not the one joe reviewed"):
        joe.approve("mean_of")
    # ... and a digest from the review of other code does not approve it either.
    with pytest.raises(ValueError, match="differs from the reviewed code"):
        joe.approve("mean_of", digest=review.digest)
    joe.deny("mean_of", reason="not what I read")
    assert joe.runs("mean_of") == 0 and not joe.pending_requests()


def test_a_digest_approves_the_same_code_on_another_datasite(ds):
    """Two owners, one review: jane approves with joe's digest only code byte-identical to what joe read."""

    def count_of(x):
        return len(x)

    with DataOwner("jane") as jane:
        jane.upload_dataset("numbers", private={"x": np.arange(4.0)}, mock={"x": np.zeros(4)})
        jane.add_data_scientist(EMAIL, PASSWORD)
        jane_ds = jane.login(EMAIL, PASSWORD)
        _request(jane_ds, count_of, x=jane_ds.datasets["numbers"].assets["x"])
        _request(ds, count_of, limit=1, x=ds.datasets["numbers"].assets["x"])
        joe = workers.get_owner("joe")
        digest = joe.code_of("count_of").digest
        assert jane.code_of("count_of").digest == digest  # same code, policies and asset names
        jane.approve("count_of", digest=digest)
        assert call(jane_ds.code.count_of, x=jane_ds.datasets["numbers"].assets["x"]) == 4
        joe.deny("count_of", reason="not needed")


def test_upload_of_an_existing_dataset_name_stores_nothing(joe):
    before = len(joe.client.datasets.get_all())
    with pytest.raises(ValueError, match="already holds a dataset named 'numbers'"):
        joe.upload_dataset("numbers", private={"x": np.full(6, 99.0)}, mock={"x": np.zeros(6)})
    assert len(joe.client.datasets.get_all()) == before
    assert np.array_equal(joe.client.datasets["numbers"].assets["x"].data, np.arange(6.0))


def test_unknown_request_names_are_clear_errors(joe):
    with pytest.raises(ValueError, match="no pending request for a function named 'nope'"):
        joe.approve("nope")
    with pytest.raises(ValueError, match="never received"):
        joe.runs("nope")


def test_restarting_an_owner_replaces_it_and_resets_its_data():
    first = DataOwner("restart")
    first.upload_dataset("d", private={"x": np.ones(2)}, mock={"x": np.zeros(2)})
    second = DataOwner("restart")
    try:
        assert not first.is_running and second.is_running
        assert len(second.client.datasets.get_all()) == 0
        with pytest.raises(RuntimeError, match="shut down"):
            first.add_data_scientist("a@b.c", "pw")
    finally:
        second.shutdown()
    second.shutdown()  # twice is fine


def test_http_datasite_answers_by_url_and_frees_its_port():
    import requests

    port = next(p for p in range(8230, 8260) if workers.port_is_free(p))
    with DataOwner("webjoe", port=port) as owner:
        assert owner.url == f"http://127.0.0.1:{port}"
        # An attacker who knows syft's demo credential is refused; the owner's fresh password works.
        assert owner.admin_password != workers.ADMIN_PASSWORD and len(owner.admin_password) >= 24
        with workers.quiet(), pytest.raises(Exception, match="[Ii]nvalid|[Pp]assword|[Cc]redential"):
            sy.login(url="http://127.0.0.1", port=port, email=workers.ADMIN_EMAIL,
                     password=workers.ADMIN_PASSWORD)
        with workers.quiet():
            assert sy.login(url="http://127.0.0.1", port=port, email=workers.ADMIN_EMAIL,
                            password=owner.admin_password).name == "webjoe"
        assert not workers.port_is_free(port)
        assert requests.get(f"{owner.url}/api/v2/metadata", timeout=10).status_code == 200
        owner.add_data_scientist(EMAIL, PASSWORD)
        client = owner.login(EMAIL, PASSWORD)
        assert client.name == "webjoe"
        with pytest.raises(ValueError, match="already in use"):
            DataOwner("other", port=port)
    assert workers.port_is_free(port)
    assert "webjoe" not in workers.running_owners()


def test_shutdown_all_leaves_no_servers_or_folders():
    a, b = DataOwner("tmp-a"), DataOwner("tmp-b")
    assert workers.TEMP_ROOT.exists()
    workers.shutdown_all()
    assert not a.is_running and not b.is_running
    assert workers.running_owners() == []
    assert not workers.TEMP_ROOT.exists()
