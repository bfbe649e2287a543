"""What the faces pages show, as plain functions over the database (no HTTP here): the faces grid with its
filters and keyset paging, and the choices for labelling. The model versions are in waifu.web.versions."""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from typing import Any

from sqlalchemy import ColumnElement, Float, and_, case, cast, func, literal, or_
from sqlmodel import Session, col, select

from db.ids import MAX_BIGINT_ID, MAX_INTEGER_ID
from db.models import TAG_CHARS, Character, Face, FaceState, LabelSource, PostCharacter, Split

PAGE_SIZE = 200
MAX_PAGE_SIZE = 500
SOURCES = ("ambiguous", "inferred", "tag", "manual", "none")
STATES = (FaceState.ready.value, FaceState.rejected.value)
COUNT_CAP = 10_000  # counting stops here: "more than 10,000 match" costs the same at any size
ORDERS = ("id", "useful")  # face id, or most useful to label first (labels.priority)


class BadInput(ValueError):
    """A query or form value that cannot be used; the message says which and why."""


def parse_id(value: str | None, what: str = "id", maximum: int = MAX_BIGINT_ID) -> int:
    """A positive database id from text, at most `maximum`, or BadInput. ASCII digits only (`str.isdigit`
    also takes `²` and `①`, which `int` refuses), at most 19 of them (BIGINT)."""
    text = (value or "").strip()
    if not re.fullmatch(r"[0-9]{1,19}", text) or int(text) == 0:
        raise BadInput(f"{what} must be a positive whole number, not {text[:40]!r}")
    if int(text) > maximum:
        raise BadInput(f"{what} must be a positive whole number up to {maximum}, not {text}")
    return int(text)


@dataclass(frozen=True)
class FaceFilter:
    source: str | None = None  # ambiguous / tag / inferred / manual / none (no label source yet)
    character: str | None = None  # label or suggestion
    split: str | None = None
    state: str | None = FaceState.ready.value  # ready / rejected / None: both
    suggested: bool | None = None
    doubtful: bool | None = None  # a tag label labels.weak doubts (yes) or not (no)
    below: float | None = None  # suggestion probability under this
    post: int | None = None
    after: int | None = None  # keyset paging by face id
    before: int | None = None
    size: int = PAGE_SIZE
    order: str = "id"
    at: float | None = None  # order=useful: the usefulness of the `after`/`before` face (keyset)

    def query(self, **changes: Any) -> dict[str, str]:
        """The filter as query parameters (for links), with `changes` applied; paging is dropped unless given."""
        values = {
            "source": self.source,
            "character": self.character,
            "split": self.split,
            "state": self.state or "any",
            "suggested": None if self.suggested is None else ("yes" if self.suggested else "no"),
            "doubtful": None if self.doubtful is None else ("yes" if self.doubtful else "no"),
            "below": self.below,
            "post": self.post,
            "size": self.size if self.size != PAGE_SIZE else None,
            "order": self.order if self.order != "id" else None,
        }
        values.update(changes)
        return {k: str(v) for k, v in values.items() if v is not None and v != ""}


def parse_filter(params: Mapping[str, str]) -> FaceFilter:
    """The faces grid's query parameters, checked; BadInput names the first bad one."""

    def choice(key: str, allowed: tuple[str, ...]) -> str | None:
        value = (params.get(key) or "").strip()
        if not value:
            return None
        if value not in allowed:
            raise BadInput(f"{key} must be one of {', '.join(allowed)}, not {value[:40]!r}")
        return value

    source = choice("source", SOURCES)
    order = choice("order", ORDERS) or "id"
    at = None
    if order == "useful" and (params.get("at") or "").strip():
        try:
            at = float(params["at"])
        except ValueError:
            raise BadInput(f"at must be a number, not {params['at'][:40]!r}") from None
        if not 0 <= at <= 1:
            raise BadInput(f"at must be between 0 and 1, not {at}")
    split = choice("split", tuple(s.value for s in Split))
    state_text = (params.get("state") or "").strip()
    state = None if state_text == "any" else choice("state", STATES) if state_text else FaceState.ready.value
    suggested_text = choice("suggested", ("yes", "no"))
    doubtful_text = choice("doubtful", ("yes", "no"))
    below = None
    if (params.get("below") or "").strip():
        try:
            below = float(params["below"])
        except ValueError:
            raise BadInput(f"below must be a probability between 0 and 1, not {params['below'][:40]!r}") from None
        if not 0 <= below <= 1:
            raise BadInput(f"below must be a probability between 0 and 1, not {below}")
    size = PAGE_SIZE
    if (params.get("size") or "").strip():
        size = parse_id(params["size"], "size")
        if size > MAX_PAGE_SIZE:
            raise BadInput(f"size must be at most {MAX_PAGE_SIZE}")
    character = (params.get("character") or "").strip() or None
    if character is not None and len(character) > TAG_CHARS:
        raise BadInput("character is too long")
    optional_id = {
        key: parse_id(params[key], key, maximum) if (params.get(key) or "").strip() else None
        for key, maximum in (("post", MAX_BIGINT_ID), ("after", MAX_INTEGER_ID), ("before", MAX_INTEGER_ID))
    }
    return FaceFilter(
        source=source,
        character=character,
        split=split,
        state=state,
        suggested=None if suggested_text is None else suggested_text == "yes",
        doubtful=None if doubtful_text is None else doubtful_text == "yes",
        below=below,
        size=size,
        order=order,
        at=at,
        **optional_id,
    )


def _conditions(f: FaceFilter) -> list[ColumnElement[bool]]:
    # SQLite prefers the state index (one value holds nearly every face) to the far more selective label,
    # suggestion or post indexes; `state || ''` takes it out of the running when one of those filters is set
    # (a rare character: 130 ms -> 1 ms at 100,000 faces). PostgreSQL plans by its statistics either way.
    selective = f.character is not None or f.post is not None or f.doubtful is True
    state = col(Face.state).concat("") if selective else col(Face.state)
    conditions: list[ColumnElement[bool]] = [state.in_([f.state] if f.state else STATES)]
    if f.source == "none":
        conditions.append(col(Face.label_source).is_(None))
    elif f.source:
        conditions.append(col(Face.label_source) == f.source)
    if f.character:
        conditions.append(or_(col(Face.label) == f.character, col(Face.suggestion) == f.character))
    if f.split:
        conditions.append(col(Face.split) == f.split)
    if f.suggested is not None:
        conditions.append(col(Face.suggestion).is_not(None) if f.suggested else col(Face.suggestion).is_(None))
    if f.doubtful is not None:
        doubt = col(Face.doubt_score)
        conditions.append(doubt.is_not(None) if f.doubtful else doubt.is_(None))
    if f.below is not None:
        conditions.append(col(Face.suggestion_score) < f.below)
    if f.post is not None:
        conditions.append(col(Face.post_id) == f.post)
    return conditions


@dataclass
class FaceCard:
    id: int
    post_id: int
    state: str
    label: str | None
    label_source: str | None
    split: str | None
    suggestion: str | None
    suggestion_score: float | None
    doubt: str | None = None  # why labels.weak doubts a tag label
    doubt_score: float | None = None
    inferred_margin: float | None = None  # an inferred label's margin over the post's other faces
    usefulness: float | None = None  # order=useful: what labelling this face is worth (labels.priority)
    post_tags: list[str] = field(default_factory=list)  # the post's tracked characters
    choices: list[str] = field(default_factory=list)  # label choices: the post's characters first, then the rest

    def to_json(self) -> dict[str, Any]:
        return {
            "id": self.id,
            "state": self.state,
            "label": self.label,
            "label_source": self.label_source,
            "split": self.split,
            "suggestion": self.suggestion,
            "suggestion_score": self.suggestion_score,
        }


@dataclass
class FacePage:
    filter: FaceFilter
    cards: list[FaceCard]
    total: int  # at most COUNT_CAP + 1 (then: more than COUNT_CAP)
    characters: list[str]
    previous: dict[str, str] | None = None  # query parameters of the previous / next page
    next: dict[str, str] | None = None


CARD_COLUMNS = (
    Face.id,
    Face.post_id,
    Face.state,
    Face.label,
    Face.label_source,
    Face.split,
    Face.suggestion,
    Face.suggestion_score,
    Face.doubt,
    Face.doubt_score,
    Face.inferred_margin,
)


def _select_cards(*extra: Any) -> Any:
    """SELECT of the card columns (and `extra`): untyped, as sqlmodel types select() for 4 columns at most."""
    return select(*CARD_COLUMNS, *extra)  # type: ignore[call-overload]


def faces_page(session: Session, f: FaceFilter) -> FacePage:
    """One page of faces in id order (keyset: `after`/`before` an id), the total matching, paging links."""
    if f.order == "useful":
        return useful_page(session, f)
    conditions = _conditions(f)
    query = _select_cards().where(*conditions)
    if f.before is not None:
        rows = list(session.exec(query.where(col(Face.id) < f.before).order_by(col(Face.id).desc()).limit(f.size + 1)))
        more_before, rows = len(rows) > f.size, rows[: f.size][::-1]
        more_after = bool(rows) and _exists(session, conditions, col(Face.id) > rows[-1][0])
    else:
        start = query.where(col(Face.id) > f.after) if f.after is not None else query
        rows = list(session.exec(start.order_by(col(Face.id)).limit(f.size + 1)))
        more_after, rows = len(rows) > f.size, rows[: f.size]
        more_before = bool(rows) and f.after is not None and _exists(session, conditions, col(Face.id) < rows[0][0])
    capped = select(Face.id).where(*conditions).limit(COUNT_CAP + 1).subquery()
    total = session.exec(select(func.count()).select_from(capped)).one()
    page = _page(session, f, [FaceCard(*row) for row in rows], int(total))
    if rows and more_before:
        page.previous = f.query(before=rows[0][0])
    if rows and more_after:
        page.next = f.query(after=rows[-1][0])
    return page


def _page(session: Session, f: FaceFilter, cards: list[FaceCard], total: int) -> FacePage:
    characters = tracked_characters(session)
    tags = post_tags(session, {card.post_id for card in cards})
    for card in cards:
        card.post_tags = tags.get(card.post_id, [])
        card.choices = card.post_tags + [c for c in characters if c not in card.post_tags]
    return FacePage(replace(f, after=None, before=None, at=None), cards, total, characters)


def usefulness_column(session: Session):
    """labels.priority.usefulness as a SQL expression over a face row (the same rule, computed by the
    database so a page reads only its own faces): doubt x rarity x plausibility."""
    from labels.priority import NO_SUGGESTION, RARE, UNTAGGED

    one = literal(1.0, Float)
    labelled = (
        select(col(Face.label).label("character"), cast(func.count(), Float).label("n"))
        .where(
            col(Face.state) == FaceState.ready,
            col(Face.label_source).in_([LabelSource.tag, LabelSource.manual, LabelSource.inferred]),
            col(Face.doubt_score).is_(None),
            col(Face.label).is_not(None),
        )
        .group_by(col(Face.label))
        .subquery()
    )
    open_face = or_(col(Face.label_source).is_(None), col(Face.label_source) == LabelSource.ambiguous)
    # the post's tracked characters as (post, tag) rows, joined on the face's suggestion: one hash join
    # instead of a probe per face (PostgreSQL: 760 -> 150 ms at 100,000 faces, bench/web.py)
    post_tags = (
        select(col(PostCharacter.post_id).label("post_id"), col(Character.tag).label("tag"))
        .join(Character, col(Character.id) == PostCharacter.character_id)
        .subquery()
    )
    tagged = col(post_tags.c.post_id).is_not(None)
    doubt = case(
        (
            open_face,
            case(
                (col(Face.suggestion_score).is_(None), literal(NO_SUGGESTION, Float)),
                else_=(one - Face.suggestion_score) * case((tagged, one), else_=literal(UNTAGGED, Float)),
            ),
        ),
        (
            col(Face.label_source) == LabelSource.inferred,
            case(
                (func.coalesce(Face.inferred_margin, 0.0) >= one, literal(0.0, Float)),
                else_=one - func.coalesce(Face.inferred_margin, 0.0),
            ),
        ),
        (
            and_(col(Face.label_source) == LabelSource.tag, col(Face.doubt_score).is_not(None)),
            one - Face.doubt_score,
        ),
        else_=literal(0.0, Float),
    )
    character = case((open_face, Face.suggestion), else_=Face.label)
    rare = literal(RARE, Float)
    # doubt is never negative (probabilities and margins are within 0..1): no clamp
    value = doubt * rare / (rare + func.coalesce(labelled.c.n, 0.0))
    joins = [
        (labelled, labelled.c.character == character),
        (post_tags, and_(post_tags.c.post_id == Face.post_id, post_tags.c.tag == Face.suggestion)),
    ]
    return value.label("usefulness"), joins


def useful_page(session: Session, f: FaceFilter) -> FacePage:
    """One page in the most-useful-first order (labels.priority), ties by id; keyset paging by
    (usefulness, id) of the page's last or first face, so labelling the faces of one page (they drop to
    the end) skips no other face."""
    value, joins = usefulness_column(session)
    conditions = _conditions(f)
    query = _select_cards(value).select_from(Face)
    for table, on in joins:
        query = query.outerjoin(table, on)
    query = query.where(*conditions)
    at = literal(f.at or 0.0, Float)
    if f.before is not None:
        rows = list(
            session.exec(
                query.where(or_(value > at, and_(value == at, col(Face.id) < f.before)))
                .order_by(value, col(Face.id).desc())
                .limit(f.size + 1)
            )
        )
        more_before, rows = len(rows) > f.size, rows[: f.size][::-1]
        more_after = bool(rows)
    else:
        start = (
            query.where(or_(value < at, and_(value == at, col(Face.id) > f.after))) if f.after is not None else query
        )
        rows = list(session.exec(start.order_by(value.desc(), Face.id).limit(f.size + 1)))
        more_after, rows = len(rows) > f.size, rows[: f.size]
        more_before = bool(rows) and f.after is not None
    capped = select(Face.id).where(*conditions).limit(COUNT_CAP + 1).subquery()
    total = session.exec(select(func.count()).select_from(capped)).one()
    cards = []
    for row in rows:
        card = FaceCard(*row[:-1])
        card.usefulness = float(row[-1])
        cards.append(card)
    page = _page(session, f, cards, int(total))
    if rows and more_before:
        page.previous = f.query(before=cards[0].id, at=repr(cards[0].usefulness))
    if rows and more_after:
        page.next = f.query(after=cards[-1].id, at=repr(cards[-1].usefulness))
    return page


def _exists(session: Session, conditions: list, extra: ColumnElement[bool]) -> bool:
    return session.exec(select(Face.id).where(*conditions, extra).limit(1)).first() is not None


def tracked_characters(session: Session) -> list[str]:
    return list(session.exec(select(Character.tag).order_by(col(Character.tag))).all())


def post_tags(session: Session, post_ids: set[int]) -> dict[int, list[str]]:
    """Each post's tracked characters (via PostCharacter), sorted."""
    if not post_ids:
        return {}
    rows = session.exec(
        select(PostCharacter.post_id, Character.tag)
        .join(Character, col(Character.id) == PostCharacter.character_id)
        .where(col(PostCharacter.post_id).in_(post_ids))
        .order_by(col(Character.tag))
    ).all()
    tags: dict[int, list[str]] = {}
    for post_id, tag in rows:
        tags.setdefault(post_id, []).append(tag)
    return tags


def face_cards(session: Session, face_ids: list[int]) -> list[dict[str, Any]]:
    """Faces as the page's script redraws them after an action."""
    rows = session.exec(_select_cards().where(col(Face.id).in_(face_ids)).order_by(col(Face.id))).all()
    return [FaceCard(*row).to_json() for row in rows]
