"""The host buffer pool of offloaded checkpointing (fusedlora.checkpoint): buffers serve inputs of every size of
their class (dynamic padding changes the length each step), idle buffers of other sizes make room at the bound,
and the default bound reads the memory cgroup's limit as well as MemAvailable, never "no bound"."""

import warnings

import pytest
import torch
from conftest import DEVICE
from test_checkpoint import EXACT, _assert_equal, _model, _step

import fusedlora.checkpoint as ck

GIB = 2**30
PER_INPUT = 2 * 16 * 64 * 4  # a decoder layer's input at batch 2 x seq 16, hidden 64, fp32 (test_hf_patch's SMALL)


def test_inputs_of_changing_length_reuse_and_replace_host_buffers():
    """Dynamic padding: steps of 16, 24, 12 and 16 tokens under a bound of two 24-token buffers. Every layer input
    finds a host buffer (the 24-token step frees the idle 16-token ones, the shorter steps reuse the 24-token
    ones), the pool never passes its bound, and every step equals the plain patched model's."""
    plain, _ = _model()
    limit = 2 * 16384  # two 24-token inputs (12288 bytes each, in the 16384-byte class)
    model, _ = _model(offload_checkpoints=True, offload_host_limit_gib=limit / GIB)
    offloader = model.base_model.model.model.layers[0]._gradient_checkpointing_func.keywords["offloader"]
    for seq in (16, 24, 12, 16):
        with warnings.catch_warnings():
            warnings.simplefilter("error", UserWarning)  # "... stay on the GPU" would be raised
            got = _step(model, seq=seq)
        _assert_equal(got, _step(plain, seq=seq), EXACT)
        assert offloader.kept_on_device == 0 and offloader.pool.made <= limit, (seq, offloader.pool.made)
    idle = [(k, len(b)) for k, b in offloader.pool.free.items() if b]
    assert idle == [((limit // 2, DEVICE == "cuda"), 2)], idle  # the 24-token buffers serve the shorter steps


def test_a_buffer_is_viewed_to_any_input_of_its_class():
    pool = ck._HostPool(limit=1 << 20)
    x = torch.arange(250, dtype=torch.float32).view(10, 25)  # 1000 bytes: the 1024-byte class
    host, key, buf = pool.take(x)
    host.copy_(x)
    assert host.shape == x.shape and host.dtype == x.dtype and torch.equal(host, x) and key == (1024, False)
    pool.give(key, buf)
    y = torch.ones(3, 7, 11, dtype=torch.bfloat16)  # 462 bytes: a smaller class takes the idle larger buffer
    host, key2, buf2 = pool.take(y)
    assert buf2 is buf and key2 == key and host.shape == y.shape and host.dtype == torch.bfloat16
    assert pool.made == 1024


def test_the_bound_frees_idle_buffers_of_other_sizes_and_never_passes():
    pool = ck._HostPool(limit=4096)
    small = [pool.take(torch.empty(256, dtype=torch.float32)) for _ in range(4)]  # 4 x 1024 bytes: the bound
    assert pool.made == 4096 and pool.take(torch.empty(2048, dtype=torch.uint8)) is None  # none idle yet
    for _, key, buf in small[:2]:
        pool.give(key, buf)
    _, key, _ = pool.take(torch.empty(2048, dtype=torch.uint8))  # the two idle 1024-byte buffers make room
    assert key == (2048, False) and pool.made == 4096 and not any(pool.free.values())


@pytest.mark.gpu
def test_pinned_buffers_for_cuda_inputs_and_their_release_at_the_bound():
    """CUDA inputs get pinned buffers; at the bound the idle pinned ones are dropped and torch's cached pinned
    blocks handed back (empty_host_cache), so the bound counts what is really pinned."""
    assert ck._empty_host_cache() is not None, "this torch cannot release cached pinned memory"
    pool = ck._HostPool(limit=4096)
    small = [pool.take(torch.empty(256, device="cuda")) for _ in range(4)]
    assert all(buf.is_pinned() and key == (1024, True) for _, key, buf in small)
    for _, key, buf in small[:2]:
        pool.give(key, buf)
    del small
    host, key, buf = pool.take(torch.empty(512, device="cuda"))
    assert key == (2048, True) and buf.is_pinned() and host.is_pinned() and pool.made == 4096


def _host_files(tmp_path, meminfo_kib=None, cgroup=(), v1=None, v2=None, v2_at=""):
    """Fake /proc/meminfo, /proc/self/cgroup and a cgroup mount under tmp_path; returns monkeypatch targets."""
    tmp_path.mkdir(parents=True, exist_ok=True)
    meminfo = tmp_path / "meminfo"
    if meminfo_kib is not None:
        meminfo.write_text(f"MemTotal:       99999999 kB\nMemAvailable:   {meminfo_kib} kB\n")
    (tmp_path / "cgroup").write_text("".join(f"{line}\n" for line in cgroup))
    mount = tmp_path / "mnt"
    if v2 is not None:
        d = mount / v2_at
        d.mkdir(parents=True)
        (d / "memory.max").write_text(f"{v2[0]}\n")
        (d / "memory.current").write_text(f"{v2[1]}\n")
    if v1 is not None:
        d = mount / "memory"
        d.mkdir(parents=True)
        (d / "memory.limit_in_bytes").write_text(f"{v1[0]}\n")
        (d / "memory.usage_in_bytes").write_text(f"{v1[1]}\n")
    return {"MEMINFO": str(meminfo), "PROC_CGROUP": str(tmp_path / "cgroup"), "CGROUP_MOUNT": str(mount)}


@pytest.mark.parametrize(
    "case, files, expected",
    [
        ("meminfo only", dict(meminfo_kib=10 * 2**20), 10 * GIB),
        ("cgroup v2 limit", dict(meminfo_kib=10 * 2**20, v2=(4 * GIB, GIB)), 3 * GIB),
        ("cgroup v2 without limit", dict(meminfo_kib=10 * 2**20, v2=("max", GIB)), 10 * GIB),
        (
            "the process's own v2 cgroup",
            dict(meminfo_kib=10 * 2**20, cgroup=["0::/job/7"], v2=(2 * GIB, 0), v2_at="job/7"),
            2 * GIB,
        ),
        ("cgroup v1 limit", dict(meminfo_kib=10 * 2**20, cgroup=["4:memory:/"], v1=(2 * GIB, GIB // 2)), 3 * GIB // 2),
        ("cgroup v1 unlimited", dict(meminfo_kib=10 * 2**20, v1=(9223372036854771712, GIB)), 10 * GIB),
        ("limit below usage", dict(meminfo_kib=10 * 2**20, v2=(GIB, 2 * GIB)), 0),
    ],
)
def test_default_bound_reads_the_cgroup_limit(tmp_path, monkeypatch, case, files, expected):
    for name, value in _host_files(tmp_path, **files).items():
        monkeypatch.setattr(ck, name, value)
    assert ck._default_host_bound() == int(ck.HOST_SHARE * expected), case


def test_unreadable_meminfo_gives_a_conservative_bound_and_a_warning(tmp_path, monkeypatch):
    for name, value in _host_files(tmp_path).items():
        monkeypatch.setattr(ck, name, value)
    pool = ck._HostPool()
    with pytest.warns(UserWarning, match="cannot read MemAvailable"):
        assert pool.take(torch.empty(16)) is not None
    assert pool.limit == ck.CONSERVATIVE_HOST_BYTES
    for name, value in _host_files(tmp_path / "cg", v2=(2 * GIB, 0)).items():
        monkeypatch.setattr(ck, name, value)
    with pytest.warns(UserWarning, match="cannot read MemAvailable"):
        assert ck._default_host_bound() == int(ck.HOST_SHARE * 2 * GIB)  # the cgroup's, when it is lower
