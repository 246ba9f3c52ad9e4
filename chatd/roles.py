"""GradAgenda group access control (issue 23; docs/protocols.md, "Roles").

Pure rules, no I/O: who may change a group, and what its roles become.

- Roles: ``owner``, ``admin``, ``member`` (the default, not stored in the
  maps below: a ``roles`` map holds owners and admins only).
- The creator owns the group.
- Only an owner or an admin may change the member list or delete the
  group; only an owner may change who the admins are (``admin-id``).
  An admin cannot remove an owner.
- Any member may leave: a ``request-mutable-session-modification`` whose
  ``user-id`` is the members without the asker (and nothing else changed)
  is a leave, allowed to everyone, as a 2014 client would write it.
- Hand-on rule: when a change leaves a group with members but no owner,
  the first admin in user-id order (Unicode code points) becomes owner;
  if there is no admin, the first member in that order. Deterministic
  from the member list alone, so every node reaches the same owner.

The store keeps the role per member (``members.role``; the ``role``
functions at the bottom run inside ``Store.run_batch``).
"""

from __future__ import annotations

from collections.abc import Iterable

from chatd.store import Store

OWNER, ADMIN = "owner", "admin"

NOT_ALLOWED = ("only the group's owner and admins may change its members or delete it "
               "(you are a member; to leave, send the members without yourself)")
NOT_OWNER = "only the group's owner may change who the admins are"
OWNER_STAYS = "an admin cannot remove the group's owner"


def role(roles: dict[str, str], user: str) -> str:
    return roles.get(user, "member")


def may_delete(roles: dict[str, str], user: str) -> str | None:
    """None if ``user`` may delete the group, else why not."""
    return None if role(roles, user) in (OWNER, ADMIN) else NOT_ALLOWED


def change(roles: dict[str, str], old: frozenset[str], new: frozenset[str], asker: str,
           admins: Iterable[str] | None) -> dict[str, str] | str:
    """The roles after ``asker`` changes the members from ``old`` to ``new``
    (and the admins to ``admins`` if not None): a new map, or why the
    change is refused."""
    mine = role(roles, asker)
    admins = None if admins is None else frozenset(admins)
    current_admins = frozenset(u for u, r in roles.items() if r == ADMIN)
    leaving = new == old - {asker} and asker in old and (
        admins is None or admins == current_admins - {asker})
    if not leaving:
        if mine not in (OWNER, ADMIN):
            return NOT_ALLOWED
        if admins is not None and admins != current_admins and mine != OWNER:
            return NOT_OWNER
        if mine == ADMIN and any(role(roles, u) == OWNER for u in old - new):
            return OWNER_STAYS
        if admins is not None:
            outside = sorted(admins - new)
            if outside:
                return f"admin-id names {', '.join(outside)}, not in user-id"
    result = {u: r for u, r in roles.items() if u in new}
    if admins is not None and not leaving:
        result = {u: r for u, r in result.items() if r == OWNER}
        for user in admins:
            result.setdefault(user, ADMIN)
    return hand_on(result, new)


def hand_on(roles: dict[str, str], members: Iterable[str]) -> dict[str, str]:
    """``roles`` with an owner, by the hand-on rule, if it has none."""
    members = sorted(members)
    if not members or OWNER in roles.values():
        return roles
    admins = sorted(u for u, r in roles.items() if r == ADMIN)
    heir = admins[0] if admins else members[0]
    return {**roles, heir: OWNER}


def listed(roles: dict[str, str], which: str) -> list[str]:
    return sorted(u for u, r in roles.items() if r == which)


# --- in the store (inside Store.run_batch) ------------------------------------


def store_roles(store: Store, session_id: str, roles: dict[str, str]) -> None:
    """Set every member's role of the session to what ``roles`` says."""
    m = store.mark
    store.execute(f"UPDATE members SET role = 'member' WHERE session_id = {m} "
                  "AND role <> 'member'", (session_id,))
    for user, value in sorted(roles.items()):
        store.execute(f"UPDATE members SET role = {m} WHERE session_id = {m} AND user_id = {m}",
                      (value, session_id, user))


def load_roles(store: Store) -> dict[str, dict[str, str]]:
    """session id -> {user: role} for every owner and admin stored."""
    found: dict[str, dict[str, str]] = {}
    for session_id, user, value in store.execute(
            "SELECT session_id, user_id, role FROM members WHERE role <> 'member'", ()).fetchall():
        found.setdefault(session_id, {})[user] = value
    return found
