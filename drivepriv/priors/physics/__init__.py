"""Physics transition prior: a differentiable torch model of how highway-env moves vehicles over one policy period.

This reimplements, in torch, what one ``env.step(action)`` does to the ego vehicle
(highway-env 1.12, ``AbstractEnv._simulate``):

* ``n = simulation_frequency // policy_frequency`` substeps of ``dt = 1 / simulation_frequency``;
* on the first substep ``DiscreteMetaAction.act`` -> ``MDPVehicle.act(meta_action)`` changes the
  target speed (FASTER / SLOWER: ``speed_to_index(speed) +- 1``, clipped) or the target lane
  (``ControlledVehicle.act``: LANE_LEFT / LANE_RIGHT pick lane ``id -+ 1`` of the same road
  segment, clipped, kept only if ``AbstractLane.is_reachable_from``: not forbidden,
  ``|lateral| <= 2 width`` and ``0 <= s < length + 5``);
* on every substep ``Road.act`` -> ``ControlledVehicle.act()`` (``follow_road``, then
  ``steering_control`` and ``speed_control``) and ``Road.step`` -> ``Vehicle.step(dt)``
  (``clip_actions``, kinematic bicycle with ``beta = arctan(tan(delta) / 2)``, explicit Euler).

Assumptions (the observation does not carry the controller's internal state):

* the ego's current target speed is the target speed closest to its current speed
  (``MDPVehicle.speed_to_index(speed)``), and its current target lane is the lane closest to
  it (``RoadNetwork.get_closest_lane_index(position, heading)``). Both are exact when the
  previous meta action has settled; right after a lane change or a speed change they can be
  off (the controllers have a 0.6 s time constant against a 1 s policy period);
* at the end of a lane, ``follow_road`` continues on the next lane chosen like
  ``RoadNetwork.next_lane`` without a route (same lane id when the next road has as many
  lanes, else the closest lane; among several next roads the closest one, ties to the first).
  The roundabout's ego follows a planned route instead, so at branching nodes this can differ;
* the ego is not crashed (a crash overrides the controls with braking).

Neighbours (rows 1..) are modelled as highway-env's ``IDMVehicle`` (the ``other_vehicles_type``
of merge-v0, highway(-fast)-v0 and roundabout-v0) with ``neighbours="idm"`` (the default):

* lateral: ``follow_road`` + ``steering_control`` on their closest lane, as for the ego, but
  **no MOBIL lane changes** (``change_lane_policy``): a neighbour that starts or is in the middle
  of a lane change is predicted to keep (return to) its closest lane. Without a route, at lane
  ends they continue as ``RoadNetwork.next_lane`` picks (the roundabout's vehicles follow
  random, unobservable routes);
* longitudinal: ``IDMVehicle.acceleration`` exactly (``COMFORT_ACC_MAX`` 3, ``COMFORT_ACC_MIN``
  -5, ``DISTANCE_WANTED`` 10 m, ``TIME_WANTED`` 1.5 s, ``DELTA`` 4, target speed clipped to
  ``[0, speed limit]`` of the current lane, projected ``desired_gap``, the result clipped to
  ``+-ACC_MAX`` = 6), recomputed on every substep against the front vehicle of
  ``Road.neighbour_vehicles(self, lane_index)``: the nearest vehicle ahead (``s_front >= s``)
  whose position is on the neighbour's current (closest) lane (``on_lane`` with a 1 m margin),
  gap ``lane_distance_to`` along that lane; while the closest lane differs from the followed
  lane (at lane ends) the minimum of the two lanes' commands, as ``IDMVehicle.act`` does;
* the **front vehicle comes from the observation only**: the other observed rows (present)
  and the ego (its predicted trajectory, so a follower reacts to the ego braking or cutting
  in), plus the scenario's static obstacles (public road layout, e.g. merge-v0's
  obstacle at the ramp's end). **Vehicles that are not observed cannot be modelled**: where
  a neighbour's real leader is outside the observation (highway: 4 of ~20 vehicles are
  observed), it is predicted to drive on a free road, and unobserved vehicles never brake it;
* the **target speed is estimated**: highway-env draws each vehicle's target speed once, at
  its creation (its initial speed, ``ControlledVehicle.target_speed = speed``; merge-v0's ramp
  vehicle 30 m/s), and keeps it; the observation carries only the current speed. With
  ``neighbour_target="equilibrium"`` (default) the target speed is the one at which the
  vehicle's IDM acceleration is 0 in the observed state, ``v / (1 - (d*/d)^2)^(1/DELTA)``
  against its observed front vehicle (the observed speed on a free road), capped at the lane's
  speed limit (also where ``d* >= d``: the vehicle brakes whatever its target). This assumes
  that the vehicle has settled behind its leader; with ``"observed"`` the target speed is the
  observed speed (a follower then always brakes). Either way ``IDMVehicle.acceleration``
  clips it to ``[0, speed limit]`` of the current lane (the lanes' ``speed_limit`` is public
  road data: merge-v0 20 m/s, so its 29-32 m/s vehicles brake). Measured on real transitions
  (eval/physics_validation.py) "equilibrium" beats "observed" in merge, highway and
  roundabout; the true target speed would make merge's neighbours exact. ``DELTA`` is
  ``IDMVehicle.DELTA`` = 4; ``randomize_behavior`` draws it per vehicle in [3.5, 4.5]
  (highway, roundabout), unobservable; merge-v0 keeps 4;
* ``neighbour_vehicles_connected_lanes`` (the ``ConnectedLane*`` environments) is not modelled:
  the front vehicle is searched on the current lane only (highway-env's default).

Measured one-step neighbour position errors (eval/physics_validation.py, 400 random-action
steps, seed 0; each neighbour against the same vehicle next step; median / p90, m): merge
0.27 / 2.8 with constant speed, 7e-6 / 0.75 with IDM; highway 0.062 / 1.07 -> 0.059 / 0.66
(most of its leaders are unobserved); roundabout 6e-4 / 2.3 -> 5e-4 / 1.9 (its large errors
are route choices at exits and MOBIL lane changes). Where the target speeds are known (not to
an attacker) IDM reproduces highway-env: to float32 rounding on a test scene, and merge's p90
drops to 6e-4 m.

``neighbours="constant"`` is the simpler model used before: ``ControlledVehicle``s that keep
their speed (``target_speed = speed``, no IDM braking) and their closest lane.

Neighbours are stepped together with the ego, substep by substep. The ego is integrated once
per meta action; the neighbours once, seeing the ego at its probability-weighted position and
velocity (exact for a one-hot action; for a soft mixture the ego they react to is the mixture,
as the predicted ego row is). Their rows are then expressed relative to the predicted ego.
highway-env re-sorts neighbour rows by distance in the next observation (``order="sorted"``)
and vehicles enter or leave the perception range, so the row correspondence between
``predict``'s output and the real next observation is approximate.

Modules: :mod:`~drivepriv.priors.physics.kinematic` (:class:`KinematicPrior`: the ego's
controllers, the integration, the prediction), :mod:`~drivepriv.priors.physics.idm` (the
neighbours' IDM), :mod:`~drivepriv.priors.physics.topology` (lane topology) and
:mod:`~drivepriv.priors.physics.constants` (highway-env's constants). Lane queries on one lane
per vehicle come from :class:`~drivepriv.priors.road.RoadGeometry` (``lane_frame``,
``lane_heading_at``, ``lane_length_of``).

Everything discrete (lane choices, speed indices, lane switches at lane ends, which vehicle
is in front) is decided without gradient; everything continuous (positions, headings, speeds,
gaps, the action mixture) is differentiable.
"""

from __future__ import annotations

from drivepriv.priors.physics.kinematic import KinematicPrior

__all__ = ["KinematicPrior"]
