"""The CPU start says when DeepSpeed's shared-memory op is about to be built (a silent minute otherwise)."""

from dino_fast.engine import shm_op_is_built


def test_the_op_counts_as_built_only_when_its_library_is_there(tmp_path):
    assert not shm_op_is_built(str(tmp_path))
    op = tmp_path / "py311_cpu" / "deepspeed_shm_comm"  # torch's default root has one folder per Python/CUDA
    op.mkdir(parents=True)
    (op / "build.ninja").write_text("")  # an interrupted build leaves this and no library
    assert not shm_op_is_built(str(tmp_path))
    (op / "deepspeed_shm_comm.so").write_bytes(b"\x7fELF")
    assert shm_op_is_built(str(tmp_path))
    flat = tmp_path / "flat" / "deepspeed_shm_comm"  # TORCH_EXTENSIONS_DIR holds the op folder directly
    flat.mkdir(parents=True)
    (flat / "deepspeed_shm_comm.so").write_bytes(b"\x7fELF")
    assert shm_op_is_built(str(tmp_path / "flat"))
