"""secure_ai.pointers: pointer arithmetic on a real in-memory syft 0.9.5 datasite."""
import numpy as np
import pytest
import torch
from secure_ai.datasites import DataOwner
from secure_ai.pointers import describe, fetch, read_private, send, stored_on
from secure_ai.quiet import quiet

EMAIL, PASSWORD = "ds@example.org", "s3cret"
PRIVATE = np.arange(5.0, dtype=np.float32)


@pytest.fixture(scope="module")
def joe_and_ds(start_owner):
    return start_owner("ptr-joe", private=PRIVATE, pointer_ops=True, email=EMAIL, password=PASSWORD)


@pytest.fixture(scope="module")
def joe(joe_and_ds):
    return joe_and_ds[0]


@pytest.fixture(scope="module")
def ds(joe_and_ds):
    return joe_and_ds[1]


@pytest.fixture()
def xy(ds):
    x, y = torch.tensor([1.0, 2.0, 3.0]), torch.tensor([10.0, 20.0, 30.0])
    return x, y, send(x, ds), send(y, ds)


def test_a_sent_tensor_is_a_pointer_that_holds_no_data(joe, xy):
    x, _, x_ptr, _ = xy
    info = describe(x_ptr)
    assert info["lives on"].startswith("ptr-joe (datasite ")
    assert info["type"] == "torch.Tensor" and info["data held here"] == "none"
    assert info["object id"] == str(x_ptr.id.id)
    assert torch.equal(stored_on(joe, x_ptr), x)
    assert torch.equal(fetch(x_ptr), x)


def test_operations_on_pointers_run_on_the_datasite(joe, xy):
    x, y, x_ptr, y_ptr = xy
    z_ptr = x_ptr + y_ptr
    assert describe(z_ptr)["data held here"] == "none"  # nothing was computed here
    assert torch.equal(stored_on(joe, z_ptr), x + y)  # the result is an object in joe's store
    assert torch.equal(fetch(z_ptr), x + y)
    assert torch.equal(fetch(x_ptr * 2), x * 2)  # a plain number is sent along
    assert torch.allclose(fetch(x_ptr.exp()), x.exp())
    assert fetch(x_ptr @ y_ptr).item() == pytest.approx((x @ y).item())
    assert fetch((x_ptr - y_ptr).sum()).item() == pytest.approx((x - y).sum().item())


def test_syft_get_works_on_our_pointers(xy):
    x, y, x_ptr, y_ptr = xy
    assert torch.equal((x_ptr + y_ptr).get(), x + y)


def test_the_private_asset_cannot_be_read_without_permission(joe, ds):
    asset = ds.datasets["numbers"].assets["x"]
    with pytest.raises(PermissionError, match="no permission to read the private data of asset 'x'"):
        read_private(asset)
    with pytest.raises(PermissionError, match="ptr-joe has not given you permission"):
        fetch(asset.pointer)
    assert np.array_equal(read_private(joe.client.datasets["numbers"].assets["x"]), PRIVATE)


def test_results_computed_from_private_data_stay_unreadable(joe, ds):
    private_ptr = ds.datasets["numbers"].assets["x"].pointer
    result = private_ptr + 1
    assert describe(result)["data held here"] == "the mock's version (fake data)"
    with pytest.raises(PermissionError):
        fetch(result)
    with pytest.raises(PermissionError):  # mixing in an object you own does not open it either
        fetch(private_ptr * send(np.ones(5, dtype=np.float32), ds))
    assert np.array_equal(stored_on(joe, result), PRIVATE + 1)  # it was computed on the real data


def test_a_deleted_object_is_a_lookup_error(joe, ds):
    ptr = send(torch.zeros(2), ds)
    with quiet():
        joe.client.api.services.action.delete(ptr.id.id)
    with pytest.raises(LookupError, match="holds no object"):
        fetch(ptr)
    with pytest.raises(LookupError, match="holds no object"):
        stored_on(joe, ptr)


def test_send_needs_pointer_operations_enabled():
    with DataOwner("ptr-off") as owner:
        owner.add_data_scientist(EMAIL, PASSWORD)
        with pytest.raises(RuntimeError, match="enable_pointer_ops"):
            send(torch.zeros(2), owner.login(EMAIL, PASSWORD))


def test_non_pointers_are_rejected():
    for function in (describe, fetch):
        with pytest.raises(TypeError, match="not a pointer"):
            function(torch.zeros(2))


def test_pointer_operations_run_on_private_data_without_a_request(joe, ds):
    """FL review 3: once the owner switches pointer operations on, a data scientist computes on the private
    data without asking; only the result stays unreadable."""
    private_ptr = ds.datasets["numbers"].assets["x"].pointer
    requests_before = len(joe.client.requests.get_all())
    mean_ptr = (private_ptr / 4).mean()
    assert len(joe.client.requests.get_all()) == requests_before and not joe.pending_requests()
    assert stored_on(joe, mean_ptr) == pytest.approx((PRIVATE / 4).mean())  # computed on the real data
    with pytest.raises(PermissionError, match="has not given you permission"):
        fetch(mean_ptr)


def test_a_single_use_approval_pins_its_input_objects(joe, ds):
    """FL review 4: ``syft_function_single_use`` pins the objects the owner saw in the review. The approved
    function refuses another object of the data scientist's, and still runs on the pinned one."""
    from secure_ai.datasites import sy
    from secure_ai.remote import RemoteError, call

    asset = ds.datasets["numbers"].assets["x"]
    pinned, other = send(np.float32(2.0), ds), send(np.float32(100.0), ds)

    def scaled_sum(x, factor):
        return float(x.sum() * factor)

    with quiet():
        ds.code.request_code_execution(sy.syft_function_single_use(x=asset, factor=pinned)(scaled_sum))
    assert f"factor = object {str(pinned.id.id)[:8]}" in joe.code_of("scaled_sum")
    joe.approve("scaled_sum")
    with pytest.raises(RemoteError, match="not in allowed inputs .the approval pins the objects"):
        call(ds.code.scaled_sum, x=asset, factor=other)
    assert joe.runs("scaled_sum") == 0
    assert call(ds.code.scaled_sum, x=asset, factor=pinned) == pytest.approx(float(PRIVATE.sum()) * 2)
    assert joe.runs("scaled_sum") == 1
