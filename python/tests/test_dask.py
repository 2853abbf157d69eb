"""obelisk.dask on a LocalCluster: the same results as serial calls."""

import numpy as np
import pytest

import obelisk
from conftest import pair

distributed = pytest.importorskip("distributed")
from obelisk.dask import pairs_from_dataset, register_pairs  # noqa: E402


def test_local_cluster_matches_serial(data, tmp_path):
    pairs = pairs_from_dataset(data / "dataset.json")
    assert len(pairs) == 4 and all("fixed_labels" in p for p in pairs)
    serial = [obelisk.register(p["fixed"], p["moving"], fixed_labels=p["fixed_labels"],
                               moving_labels=p["moving_labels"], threads=1) for p in pairs]
    with distributed.LocalCluster(n_workers=2, threads_per_worker=1, processes=True,
                                  dashboard_address=None) as cluster, distributed.Client(cluster) as client:
        results = register_pairs(pairs, client, out=tmp_path / "out", with_displacement=True)
        failed = register_pairs([(pair(data)["fixed"], str(tmp_path / "nope.nii.gz"))], client, errors="return")
    assert [r.name for r in results] == [p["name"] for p in pairs]
    for s, r in zip(serial, results):
        assert r.ok
        assert np.abs(r.displacement - s.displacement).max() < 1e-4
        assert r.metrics["metrics"]["mean_dice"] == pytest.approx(s.metrics["metrics"]["mean_dice"], abs=1e-6)
        assert (tmp_path / "out" / r.name / "field.nii.gz").is_file()
        assert (tmp_path / "out" / r.name / "metrics.json").is_file()
    assert not failed[0].ok and "nope.nii.gz" in failed[0].error
