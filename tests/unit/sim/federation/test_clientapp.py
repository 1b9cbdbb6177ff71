"""The virtual node's ClientApp picks its employee by partition and replies as the deployment's."""

from __future__ import annotations

from datetime import date
from pathlib import Path

from keystay.sim.federation.clientapp import Population, client_app
from keystay.sim.federation.device import EmployeeData


def test_each_partition_is_its_own_employee_and_folder(tmp_path: Path) -> None:
    employees = tuple(EmployeeData(seed=s, role="support", day_events=(100,),
                                   end_day=date(2026, 1, 1)) for s in (11, 12))
    people = Population(tmp_path, employees)
    a, b = people.device(0), people.device(1)
    assert a.employee.seed == 11 and b.employee.seed == 12
    assert a.data_dir != b.data_dir and a.data_dir.parent == tmp_path


def test_the_app_pickles_for_ray_actors(tmp_path: Path) -> None:
    from ray import cloudpickle

    app = client_app(Population(tmp_path, ()))
    assert cloudpickle.loads(cloudpickle.dumps(app)) is not None
