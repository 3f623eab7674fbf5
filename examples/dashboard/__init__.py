"""The reference dashboard: a demo application backend (blockers, agents, tasks in SQLite), the
simulated agents and expiry sweeper, and the browser page that uses ``eventbus.js``.

``python -m examples.dashboard.run`` starts everything (see ``docs/browser.md``).
"""
