"""--ray: caption and index jobs on a local Ray with 2 CPUs (two actors, one model each) write the same Parquet
as the local jobs. One Ray start for the module (a few seconds on 2 cores)."""

import pyarrow.parquet as pq
import pytest
from world_files import GEN, ITM, write_scenes

from blip2.bulk import caption_job, load_runner
from blip2.distributed import RaySettings
from blip2.index import ImageIndex, index_job

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def ray_local():
    import ray

    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    yield
    ray.shutdown()


@pytest.fixture(scope="module")
def collection(tmp_path_factory):
    d = tmp_path_factory.mktemp("scenes")
    write_scenes(d, 24)
    (d / "broken.jpg").write_bytes(b"not an image")
    return d


def test_ray_writes_the_same_parquet(ray_local, collection, tmp_path):
    runner = load_runner(GEN, ITM)  # on one thread, as each actor
    ray = RaySettings(concurrency=2, model=GEN, itm_model=ITM)
    for name, job in (("captions.parquet", caption_job), ("index", index_job)):
        extra = {} if job is caption_job else {"model_name": ITM, "captions": True}
        local, remote = str(tmp_path / "local" / name), str(tmp_path / "ray" / name)
        summary = job(runner, [collection], local, batch_size=5, progress=False, **extra)
        assert (summary.done, summary.failed) == (25, 1)
        summary = job(None, [collection], remote, batch_size=7, progress=False, ray=ray, **extra)
        assert (summary.done, summary.failed) == (25, 1)
        if job is index_job:
            local, remote = local + "/images.parquet", remote + "/images.parquet"
        assert pq.read_table(remote).equals(pq.read_table(local))
    assert len(ImageIndex.load(str(tmp_path / "ray" / "index"))) == 24
