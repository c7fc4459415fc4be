"""Patients live in the hospital's catchment: one state, a handful of ZIP3 areas."""

from __future__ import annotations

from collections import Counter
from random import Random

from faker import Faker

from fhirlake.synthetic.person import CATCHMENT, sample_person
from fhirlake.synthetic.util import STREAM_FAKER, STREAM_PATIENT, derive_seed


def test_patients_live_in_the_catchment() -> None:
    fake = Faker("en_US")
    states: Counter[str] = Counter()
    zip3s: Counter[str] = Counter()
    for index in range(500):
        rng = Random(derive_seed(7, index, STREAM_PATIENT))
        fake.seed_instance(derive_seed(7, index, STREAM_FAKER))
        address = sample_person(rng, fake, index, 7, 5).address
        assert len(address.postal_code) == 5 and address.postal_code.isdigit()
        states[address.state] += 1
        zip3s[address.postal_code[:3]] += 1
    assert abs(sum(share for *_, share in CATCHMENT) - 1.0) < 1e-9
    assert states.most_common(1)[0][1] >= 0.95 * 500  # one home state
    assert set(zip3s) <= {zip3 for _, zip3, _ in CATCHMENT} and len(zip3s) <= 6
    assert min(zip3s.values()) >= 2  # every area is actually used
