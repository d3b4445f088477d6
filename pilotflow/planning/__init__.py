"""Bundle → Plan: resource assignment (``assign``), grouping, the MILP (``packing`` with the
``solver``), pilot sizing (``sizing``), and the simulator of the launcher's policy
(``simulate``) that checks every plan. Pure: no cluster, no printing."""

from pilotflow.planning.plan import PilotPlan, Plan, ResourcePlan, make_plan

__all__ = ["PilotPlan", "Plan", "ResourcePlan", "make_plan"]
