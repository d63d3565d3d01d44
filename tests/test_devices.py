import pytest
import torch

from kandinsky5.devices import default_dtype, parse_dtype, resolve_device


def test_cpu_defaults_to_fp32_and_accelerators_to_bf16():
    assert default_dtype(torch.device("cpu")) == torch.float32
    assert default_dtype(torch.device("cuda")) == torch.bfloat16
    assert default_dtype(torch.device("mps")) == torch.bfloat16


def test_parse_dtype_accepts_names_dtypes_and_none():
    cpu = torch.device("cpu")
    assert parse_dtype("bf16", cpu) == torch.bfloat16
    assert parse_dtype("float32", cpu) == torch.float32
    assert parse_dtype(torch.float16, cpu) == torch.float16
    assert parse_dtype(None, cpu) == torch.float32
    with pytest.raises(ValueError, match="unknown dtype"):
        parse_dtype("int8", cpu)


def test_resolve_device_explains_missing_backends():
    assert resolve_device("cpu") == torch.device("cpu")
    assert isinstance(resolve_device(None), torch.device)
    with pytest.raises(ValueError, match="unknown device"):
        resolve_device("tpu-9000")
    if not torch.cuda.is_available():
        with pytest.raises(ValueError, match="CUDA is not available"):
            resolve_device("cuda")
