"""Every kind of bad input: a one-line error naming the field or file and the fix, exit code 2,
and nothing written (no job record, no output, no temporary)."""

import os

import pytest
import zarr
from click.testing import CliRunner

from conftest import write_dense
from mx.cli.main import cli

GOOD_STEP = """  - id: c
    op: gemm
    inputs: {a: A.zarr, b: B.zarr}
    output: C.zarr
"""


@pytest.fixture
def inputs(tmp_path, rng):
    write_dense(tmp_path / "A.zarr", rng.random((13, 7)))
    write_dense(tmp_path / "B.zarr", rng.random((7, 5)))
    return tmp_path


def submit(folder, text):
    job = folder / "job.yaml"
    job.write_text(text)
    result = CliRunner().invoke(cli, ["submit", str(job)])
    return result


def assert_rejected(folder, result, *needles):
    assert result.exit_code == 2, result.output
    message = result.output.strip()
    assert message.startswith("mx: error: ") and "\n" not in message, message
    for needle in needles:
        assert needle in message, message
    assert not (folder / "C.zarr").exists()
    assert not [e for e in os.listdir(folder) if e.startswith(".")]
    home = os.environ["MX_HOME"]
    assert not os.path.exists(os.path.join(home, "jobs")) or not os.listdir(os.path.join(home, "jobs"))


def job(top="", steps=GOOD_STEP):
    return top + "steps:\n" + steps


BAD_JOBS = {
    "malformed yaml": ("steps: [\n  - id: c\n    op: gemm\n   inputs: {", ["malformed YAML", "line"]),
    "not a mapping": ("- just\n- a list\n", ["must be a YAML mapping"]),
    "key given twice": (job(steps=GOOD_STEP + "    params: {algorithm: cannon}\n"
                            "    params: {precision: fp32}\n"),
                        ["line 7, column 5", "key 'params' is given twice"]),
    "no steps": ("backend: local\n", ["steps", "required field is missing"]),
    "unknown op": (job(steps=GOOD_STEP.replace("op: gemm", "op: gemmm")),
                   ["steps[0] (id: c).op", "unknown op 'gemmm'", "gemm"]),
    "unknown top key": (job("stepz: []\n"), ["unknown key 'stepz'", "allowed keys here"]),
    "unknown step key": (job(steps=GOOD_STEP + "    parms: {}\n"),
                         ["steps[0] (id: c): unknown key 'parms'", "params"]),
    "bad step field": (job(steps=GOOD_STEP + GOOD_STEP.replace("id: c", "id: d").replace("C.zarr", "D.zarr")
                           + "    max_retries: -1\n"),
                       ["steps[1] (id: d).max_retries: ", "greater than or equal to 0"]),
    "unknown resource key": (job("resources: {worker: 4}\n"), ["resources", "unknown key 'worker'", "workers"]),
    "unknown param": (job(steps=GOOD_STEP + "    params: {algo: cannon}\n"),
                      ["steps[0] (id: c).params: unknown key 'algo'", "algorithm"]),
    "bad param value": (job(steps=GOOD_STEP + "    params: {algorithm: canon}\n"),
                        ["steps[0] (id: c).params.algorithm: ", "'canon'"]),
    "union param": (job(steps=GOOD_STEP + "    params: {memory: 1.5}\n"),
                    ["steps[0] (id: c).params.memory: ", "8GiB", "1.5"]),
    "infinite memory": (job(steps=GOOD_STEP + "    params: {memory: .inf}\n"),
                        ["steps[0] (id: c).params.memory: ", "not an amount of memory", "8GiB"]),
    "bad workers": (job("resources: {workers: 0}\n"), ["resources.workers", "greater than or equal to 1"]),
    "string workers": (job("resources: {workers: four}\n"), ["resources.workers", "'four'"]),
    "bad backend": (job("backend: spark\n"), ["backend", "'spark'"]),
    "missing input": (job(steps=GOOD_STEP.replace("A.zarr", "nope.zarr")),
                      ["steps[0] (id: c).inputs.a: ", "nope.zarr does not exist"]),
    "missing input name": (job(steps=GOOD_STEP.replace("a: A.zarr, ", "")),
                           ["steps[0] (id: c).inputs: ", "missing input 'a'"]),
    "extra input name": (job(steps=GOOD_STEP.replace("b: B.zarr", "b: B.zarr, c: B.zarr")), ["unknown input 'c'"]),
    "output is input": (job(steps=GOOD_STEP.replace("output: C.zarr", "output: ./A.zarr")),
                        ["steps[0] (id: c).output: ", "is also input 'a'"]),
    "cannon on 3 workers": (job("resources: {workers: 3}\n", GOOD_STEP + "    params: {algorithm: cannon}\n"),
                            ["steps[0] (id: c).params.algorithm: ", "square number of workers", "summa"]),
    "unknown step ref": (job(steps=GOOD_STEP.replace("a: A.zarr", "a: step:zz")),
                         ["steps[0] (id: c).inputs.a: ", "step:zz"]),
    "duplicate step id": (job(steps=GOOD_STEP + GOOD_STEP.replace("C.zarr", "D.zarr")),
                          ["steps[1].id: ", "already"]),
    "two steps one output": (job(steps=GOOD_STEP + GOOD_STEP.replace("id: c", "id: d")),
                             ["steps[1] (id: d).output: ", "already the output"]),
    "address on local": (job("backend: local\nresources: {address: 'http://127.0.0.1:1'}\n"),
                         ["resources.address", "backend: ray", "drop address"]),
    "gpus without a gpu": (job("resources: {gpus: 1}\n"), ["resources.gpus", "GPU"]),
}


@pytest.mark.parametrize("case", sorted(BAD_JOBS))
def test_bad_job_files(inputs, case):
    text, needles = BAD_JOBS[case]
    if case == "gpus without a gpu":
        from mx.cluster import devices
        if devices.gpu_count()[0] > 0:
            pytest.skip("this machine has a GPU")
    result = submit(inputs, text)
    assert_rejected(inputs, result, *needles)
    # the file is named once, at the start; a place in the job is a path of its fields
    assert "job.yaml." not in result.output and ".int" not in result.output, result.output


def test_memory_as_a_whole_number_written_with_a_point_is_bytes():
    """YAML reads 4096.0 and 2.5e+9 as floats: whole numbers of bytes all the same."""
    from mx.tasks.gemm import GemmParams, parse_bytes

    for text, nbytes in [(4096.0, 4096), (2.5e9, 2_500_000_000), ("0.5GiB", 2**29)]:
        assert parse_bytes(GemmParams(memory=text).memory, "params.memory") == nbytes


def test_a_schema_error_names_the_file_then_the_field(inputs):
    result = submit(inputs, job("resources: {workers: 0}\n"))
    assert_rejected(inputs, result)
    assert result.output.startswith(f"mx: error: {inputs / 'job.yaml'}: resources.workers: "), result.output


def test_shape_mismatch(inputs, rng):
    write_dense(inputs / "B8.zarr", rng.random((8, 5)))
    result = submit(inputs, "steps:\n" + GOOD_STEP.replace("B.zarr", "B8.zarr"))
    assert_rejected(inputs, result, "steps[0] (id: c): ", "A is 13×7 but B is 8×5", "7 ≠ 8")


def test_three_d_array(inputs, rng):
    arr = zarr.create_array(store=str(inputs / "T.zarr"), shape=(2, 3, 4), dtype="f8")
    arr[...] = rng.random((2, 3, 4))
    result = submit(inputs, "steps:\n" + GOOD_STEP.replace("A.zarr", "T.zarr"))
    assert_rejected(inputs, result, "steps[0] (id: c).inputs.a", "3-D", "2-D")


@pytest.mark.parametrize("dtype", ["complex128", "U3"])
def test_non_real_array(inputs, dtype):
    arr = zarr.create_array(store=str(inputs / "X.zarr"), shape=(13, 7), dtype=dtype)
    assert arr.shape == (13, 7)
    result = submit(inputs, "steps:\n" + GOOD_STEP.replace("A.zarr", "X.zarr"))
    assert_rejected(inputs, result, "steps[0] (id: c).inputs.a", "not a real number type")


def test_group_instead_of_array(inputs):
    zarr.open_group(str(inputs / "G.zarr"), mode="w")
    result = submit(inputs, "steps:\n" + GOOD_STEP.replace("B.zarr", "G.zarr"))
    assert_rejected(inputs, result, "steps[0] (id: c).inputs.b", "Zarr group")


def test_foreign_output_is_never_replaced(inputs):
    (inputs / "C.zarr").write_text("precious")
    job = inputs / "job.yaml"
    job.write_text("steps:\n" + GOOD_STEP)
    result = CliRunner().invoke(cli, ["submit", str(job)])
    assert result.exit_code == 2
    assert "steps[0] (id: c).output" in result.output and "not written by mx" in result.output
    assert (inputs / "C.zarr").read_text() == "precious"


def test_address_flag_with_a_local_job(inputs):
    (inputs / "job.yaml").write_text(job("backend: local\n"))
    result = CliRunner().invoke(cli, ["submit", str(inputs / "job.yaml"), "--address", "http://127.0.0.1:1"])
    assert_rejected(inputs, result, "--address", "backend: ray")


def test_missing_job_file(tmp_path):
    result = CliRunner().invoke(cli, ["submit", str(tmp_path / "none.yaml")])
    assert result.exit_code == 2 and "no such job file" in result.output


@pytest.mark.parametrize("output", ["A.zarr/C.zarr", "B.zarr/c/C.zarr"])
def test_an_output_inside_an_input_is_refused(inputs, output):
    before = sorted(p for p in os.listdir(inputs / output.split("/")[0]))
    result = submit(inputs, job(steps=GOOD_STEP.replace("output: C.zarr", f"output: {output}")))
    assert_rejected(inputs, result, "steps[0] (id: c).output: ", f"{output} is inside input",
                    "write the result outside it")
    assert sorted(os.listdir(inputs / output.split("/")[0])) == before


def test_a_job_file_that_is_not_text_is_refused_in_one_line(inputs):
    (inputs / "job.yaml").write_bytes(b"steps:\n  - id: c\xff\xfe\n")
    result = CliRunner().invoke(cli, ["submit", str(inputs / "job.yaml")])
    assert_rejected(inputs, result, "job.yaml", "not a text file", "UTF-8")


def test_data_random_bad_arguments(tmp_path):
    runner = CliRunner()
    result = runner.invoke(cli, ["data", "random", str(tmp_path / "X.zarr"), "--shape", "3"])
    assert result.exit_code == 2 and "--shape" in result.output
    result = runner.invoke(cli, ["data", "random", str(tmp_path / "X.zarr"), "--shape", "0,3"])
    assert result.exit_code == 2 and "at least 1" in result.output
    assert not os.listdir(tmp_path)


def test_a_dataset_written_by_mx_data_is_not_replaced_by_a_job(inputs):
    assert CliRunner().invoke(cli, ["data", "random", str(inputs / "C.zarr"), "--shape", "13,5"]).exit_code == 0
    before = (inputs / "C.zarr" / "zarr.json").read_text()
    result = submit(inputs, job("name: j\n"))
    assert result.exit_code == 2, result.output
    message = result.output.strip()
    assert message.startswith("mx: error: ") and "\n" not in message, message
    for needle in ("steps[0] (id: c).output", "C.zarr", "mx data", "overwrite: true"):
        assert needle in message, message
    assert (inputs / "C.zarr" / "zarr.json").read_text() == before


def test_an_output_folder_that_cannot_be_written_is_refused_before_the_job_runs(inputs):
    # /proc refuses new files even to root, for whom os.access says every folder is writable
    result = submit(inputs, job(steps=GOOD_STEP.replace("output: C.zarr", "output: /proc/mx-out/C.zarr")))
    assert_rejected(inputs, result, "steps[0] (id: c).output", "/proc/mx-out/C.zarr",
                    "/proc is not a writable folder")


def test_more_cpus_per_worker_than_the_local_ray_has_is_refused_before_ray_starts(inputs):
    result = submit(inputs, job("resources: {workers: 2, cpus_per_worker: 1000}\n"))
    assert_rejected(inputs, result, "resources.cpus_per_worker", "1000", "CPUs", "at most")


def test_a_gpu_job_sent_to_a_cluster_is_not_checked_against_this_machine(inputs):
    from mx.cluster import devices
    from mx.errors import UserError
    from mx.tasks import plan, spec

    if devices.gpu_count()[0] > 0:
        pytest.skip("this machine has a GPU")
    gpu_job = spec.parse(job("resources: {gpus: 1}\n"), "job.yaml")
    with pytest.raises(UserError, match="resources.gpus"):
        plan.plan_job(gpu_job, str(inputs), "job")
    # `mx submit --address`: the cluster's GPUs count, asked for when the job is sent
    plan.plan_job(gpu_job, str(inputs), "job", address="http://127.0.0.1:1")


def test_a_merge_key_may_override_what_it_merges():
    """Refusing keys given twice leaves YAML's `<<: *anchor` merges working, overrides included."""
    from mx.tasks import spec

    job = spec.parse("steps:\n"
                     "  - &c\n"
                     "    id: c\n"
                     "    op: gemm\n"
                     "    inputs: {a: A.zarr, b: B.zarr}\n"
                     "    output: C.zarr\n"
                     "    params: {algorithm: cannon}\n"
                     "  - <<: *c\n"
                     "    id: d\n"
                     "    output: D.zarr\n")
    assert [s.id for s in job.steps] == ["c", "d"]
    assert job.steps[1].output == "D.zarr" and job.steps[1].params == {"algorithm": "cannon"}
