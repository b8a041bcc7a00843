"""The D4RL/Minari maze2d waypoint controller, in the gymnasium-robotics PointMaze frame.

Cells are ``(row, col)`` indices of a maze map (rows of ``1`` for a wall, anything else free).
Positions are xy in maze units with the maze centred on the origin and y pointing up, as
gymnasium-robotics lays out PointMaze (``maze_size_scaling=1``): for a map of H rows and W columns
the centre of cell ``(row, col)`` is ``x = col + 0.5 - W/2``, ``y = H/2 - (row + 0.5)``.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Protocol

import numpy as np

P_GAIN = 10.0
D_GAIN = 1.0
WAYPOINT_RADIUS = 0.1
WAYPOINT_JITTER = 0.2
Q_ITERATIONS = 50
DISCOUNT = 0.99
# Up, down, left, right in (row, col).
_MOVES = ((-1, 0), (1, 0), (0, -1), (0, 1))

MazeMap = Sequence[Sequence[int | str]]


class HasMazeMap(Protocol):
    maze_map: MazeMap


def cell_centre(maze_map: MazeMap, cell: tuple[int, int]) -> np.ndarray:
    """Centre of ``cell`` in the PointMaze frame: ``(2,)`` xy."""
    rows, cols = len(maze_map), len(maze_map[0])
    return np.array([cell[1] + 0.5 - cols / 2, rows / 2 - (cell[0] + 0.5)])


class WaypointController:
    """PD control along a Q-iteration path of cell centres towards a goal position.

    The path runs on the 4-connected grid of free cells from the cell the point is in to the goal's
    cell. Its waypoints are the centres of the cells after the current one, each shifted by
    ``-WAYPOINT_JITTER * U[0, 1)`` per axis as in D4RL and Minari, except the last, which is the
    goal position itself. The action is ``P_GAIN * (waypoint - xy) - D_GAIN * velocity`` clipped to
    ``[-1, 1]``; the controller moves to the next waypoint once within ``WAYPOINT_RADIUS``. It
    plans again whenever the goal position changes.

    Args:
        maze: a ``MazeSpec`` (anything with a ``maze_map``) or a maze map.
        rng: source of the waypoint jitter; seed it for reproducible paths.
    """

    def __init__(self, maze: HasMazeMap | MazeMap, rng: np.random.Generator) -> None:
        maze_map = maze.maze_map if hasattr(maze, "maze_map") else maze
        walls = np.array([[cell == 1 for cell in row] for row in maze_map])
        self._half_rows, self._half_cols = walls.shape[0] / 2, walls.shape[1] / 2
        free = np.argwhere(~walls)
        self._cell_index = np.full(walls.shape, -1)
        self._cell_index[free[:, 0], free[:, 1]] = np.arange(len(free))
        # neighbours[s, m]: the free cell reached from s by move m, s itself where a wall or the
        # map's edge blocks it (the padding stands in for the edge).
        padded = np.pad(self._cell_index, 1, constant_values=-1)
        self._neighbours = np.empty((len(free), len(_MOVES)), dtype=np.int64)
        for m, (dr, dc) in enumerate(_MOVES):
            target = padded[free[:, 0] + 1 + dr, free[:, 1] + 1 + dc]
            self._neighbours[:, m] = np.where(target >= 0, target, np.arange(len(free)))
        self._centres = np.stack(
            [free[:, 1] + 0.5 - self._half_cols, self._half_rows - (free[:, 0] + 0.5)], axis=1
        )
        self._rng = rng
        self._next_cell: dict[int, np.ndarray] = {}
        self._goal = (math.nan, math.nan)
        self._waypoints: list[tuple[float, float]] = []
        self._current = 0

    def act(self, obs: np.ndarray, goal: np.ndarray) -> np.ndarray:
        """Action ``(2,)`` for the observation ``(4,)`` = (x, y, vx, vy) and the goal ``(2,)`` xy."""
        x, y, vx, vy = obs.tolist()
        gx, gy = goal.tolist()
        return np.array(self.control(x, y, vx, vy, gx, gy))

    def control(
        self, x: float, y: float, vx: float, vy: float, gx: float, gy: float
    ) -> tuple[float, float]:
        """``act`` on plain floats, for loops where array conversion would dominate the cost."""
        if gx != self._goal[0] or gy != self._goal[1]:
            self._plan(x, y, gx, gy)
        wx, wy = self._waypoints[self._current]
        if (
            self._current < len(self._waypoints) - 1
            and (wx - x) ** 2 + (wy - y) ** 2 <= WAYPOINT_RADIUS**2
        ):
            self._current += 1
            wx, wy = self._waypoints[self._current]
        ax = P_GAIN * (wx - x) - D_GAIN * vx
        ay = P_GAIN * (wy - y) - D_GAIN * vy
        return min(1.0, max(-1.0, ax)), min(1.0, max(-1.0, ay))

    def _cell_of(self, x: float, y: float) -> int:
        row = math.floor(self._half_rows - y)
        col = math.floor(x + self._half_cols)
        index = -1
        if 0 <= row < self._cell_index.shape[0] and 0 <= col < self._cell_index.shape[1]:
            index = int(self._cell_index[row, col])
        if index < 0:
            raise ValueError(f"position ({x:.3f}, {y:.3f}) is not in a free cell of the maze")
        return index

    def _plan(self, x: float, y: float, gx: float, gy: float) -> None:
        start, goal = self._cell_of(x, y), self._cell_of(gx, gy)
        if goal not in self._next_cell:
            self._next_cell[goal] = self._q_iteration(goal)
        next_cell = self._next_cell[goal]
        path = [start]
        while path[-1] != goal:
            if len(path) > len(next_cell):
                raise ValueError(f"goal ({gx:.3f}, {gy:.3f}) cannot be reached from ({x}, {y})")
            path.append(int(next_cell[path[-1]]))
        # The current cell is not a waypoint, and the goal cell's centre gives way to the goal.
        between = self._centres[path[1:-1]]
        between = between - WAYPOINT_JITTER * self._rng.random(between.shape)
        self._waypoints = [*map(tuple, between.tolist()), (gx, gy)]
        self._current = 0
        self._goal = (gx, gy)

    def _q_iteration(self, goal: int) -> np.ndarray:
        """Greedy next cell ``(S,)`` towards ``goal`` for each of the S free cells."""
        reward = np.zeros(len(self._centres))
        reward[goal] = 1.0
        value = np.zeros_like(reward)
        for _ in range(Q_ITERATIONS):
            value = reward + DISCOUNT * value[self._neighbours].max(axis=1)
        best_move = value[self._neighbours].argmax(axis=1)
        return self._neighbours[np.arange(len(best_move)), best_move]
