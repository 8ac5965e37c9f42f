"""Documents that change (issue [3 of 7]): collections, a document key, replace on re-ingest with the unchanged
chunks' vectors kept, forget, `ragq docs` / `ragq collections`, and search inside a small collection of a large
table — on the session's real Redis, Postgres and worker."""

from __future__ import annotations

import json
import uuid
from pathlib import Path

import pytest
from sqlalchemy import text

from tests.conftest import ragq_env, run_ragq

pytestmark = pytest.mark.integration

V1 = """# Tide mills

Tide mills store sea water behind a dam at high tide and grind grain as it flows out.

## Wheels

The wheel of the Eling mill turns eight hours a day, with the ebb.

## Owners

The mill was sold to the parish in 1802.
"""

V2 = V1.replace("sold to the parish in 1802", "given to a trust in 1975, which still runs it")


def _ingest(ragq_home: Path, *args: str) -> dict:  # type: ignore[type-arg]
    done = run_ragq(ragq_env(ragq_home), "ingest", *args, "--wait", "--json")
    assert done.returncode == 0, done.stderr
    return json.loads(done.stdout)


def _chunks_of(client, collection: str, key: str) -> list[str]:  # type: ignore[no-untyped-def]
    with client.db.connect() as conn:
        return list(conn.execute(text(
            "SELECT c.text FROM chunks c JOIN doc_keys k ON k.document_id = c.document_id "
            "WHERE k.collection = :c AND k.key = :k ORDER BY c.seq"), {"c": collection, "k": key}).scalars())


def test_one_batch_with_an_unchanged_an_edited_and_a_new_document(worker, client, ragq_home: Path, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    """Versions are looked up for a whole batch at once: each item still gets its own answer."""
    collection = f"tides-{uuid.uuid4().hex[:6]}"
    same, edited, new = (tmp_path / f"{name}.md" for name in ("same", "edited", "new"))
    same.write_text(V2.replace("Eling", "Woodbridge"))   # none of these keeps "1802" (a test below counts it)
    edited.write_text(V1)
    first = _ingest(ragq_home, str(same), str(edited), "--collection", collection)
    assert first["status"] == "completed" and first["chunks_reused"] == 0
    before = {d["key"]: d["version"] for d in client.documents(collection)}
    same_chunks = len(_chunks_of(client, collection, str(same.resolve())))
    edited.write_text(V2)
    new.write_text(V2.replace("Eling", "Thorrington"))
    second = _ingest(ragq_home, str(same), str(edited), str(new), "--collection", collection)
    assert second["status"] == "completed" and second["documents_done"] == 3
    # the edited one's unchanged chunks came from its own old version; the unchanged one added nothing
    assert 1 <= second["chunks_reused"] < same_chunks + second["chunks_reused"]
    assert second["chunks"] == second["chunks_added"] + same_chunks
    after = {d["key"]: d["version"] for d in client.documents(collection)}
    assert after[str(same.resolve())] == before[str(same.resolve())]
    assert after[str(edited.resolve())] != before[str(edited.resolve())] and str(new.resolve()) in after
    assert "trust in 1975" in " ".join(_chunks_of(client, collection, str(edited.resolve())))
    assert "Thorrington" in " ".join(_chunks_of(client, collection, str(new.resolve())))


def test_a_changed_document_replaces_its_old_version(worker, client, ragq_home: Path, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    collection = f"tides-{uuid.uuid4().hex[:6]}"
    path = tmp_path / "tide-mills.md"
    path.write_text(V1)
    first = _ingest(ragq_home, str(path), "--collection", collection)
    assert first["chunks_added"] >= 2 and first["chunks_reused"] == 0
    again = _ingest(ragq_home, str(path), "--collection", collection)
    assert again["chunks_added"] == 0 and again["chunks_reused"] == 0   # the same content adds nothing
    path.write_text(V2)
    second = _ingest(ragq_home, str(path), "--collection", collection)
    assert second["status"] == "completed"
    assert second["chunks_reused"] >= 1                                  # unchanged chunks kept their vectors
    assert second["chunks_added"] == second["chunks"]
    texts = " ".join(_chunks_of(client, collection, str(path.resolve())))
    assert "trust in 1975" in texts and "1802" not in texts              # one version: the new one
    docs = client.documents(collection)
    assert [d["key"] for d in docs] == [str(path.resolve())] and docs[0]["chunks"] == len(_chunks_of(
        client, collection, str(path.resolve())))
    with client.db.connect() as conn:                                    # the old version and its chunks are gone
        old = conn.execute(text("SELECT count(*) FROM chunks WHERE text LIKE '%sold to the parish in 1802%'")).scalar()
    assert old == 0
    reply = client.ask("Who runs the Eling tide mill now?", collection=collection, top_k=3, timeout_s=60)
    assert all("1802" not in s["text"] for s in reply["sources"])
    assert all(s["key"] == str(path.resolve()) for s in reply["sources"])


def test_questions_search_their_collection_only(worker, client, ragq_home: Path, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    tag = uuid.uuid4().hex[:6]
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    (tmp_path / "a" / "owls.md").write_text("# Owls\n\nBarn owls hunt voles over meadows at dusk.\n")
    (tmp_path / "b" / "eels.md").write_text("# Eels\n\nEuropean eels cross the Atlantic to spawn in the Sargasso Sea.\n")
    _ingest(ragq_home, str(tmp_path / "a"), "--collection", f"a-{tag}")
    _ingest(ragq_home, str(tmp_path / "b"), "--collection", f"b-{tag}")
    reply = client.ask("Where do eels spawn?", collection=f"a-{tag}", top_k=5, timeout_s=60)
    assert {s["document"] for s in reply["sources"]} == {"owls"}
    reply = client.ask("Where do eels spawn?", collection=f"b-{tag}", top_k=5, timeout_s=60)
    assert {s["document"] for s in reply["sources"]} == {"eels"}
    listed = run_ragq(ragq_env(ragq_home), "collections", "--json")
    assert listed.returncode == 0, listed.stderr
    counts = {c["collection"]: (c["documents"], c["chunks"]) for c in json.loads(listed.stdout)}
    assert counts[f"a-{tag}"][0] == 1 and counts[f"b-{tag}"][0] == 1 and counts[f"a-{tag}"][1] >= 1
    bad = run_ragq(ragq_env(ragq_home), "ask", "x?", "--collection", "no spaces please")
    assert bad.returncode == 2 and "--collection" in bad.stderr


def test_forget_removes_documents_and_names_unknown_keys(worker, client, ragq_home: Path, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    collection = f"forget-{uuid.uuid4().hex[:6]}"
    for name in ("one", "two", "three"):
        (tmp_path / f"{name}.md").write_text(f"# {name.title()}\n\nThe {name} document talks of {name} things.\n")
    _ingest(ragq_home, str(tmp_path), "--collection", collection)
    keys = [str((tmp_path / f"{n}.md").resolve()) for n in ("one", "two")]
    env = ragq_env(ragq_home)
    done = run_ragq(env, "forget", keys[0], "/no/such/key.md", "--collection", collection, "--json")
    assert done.returncode == 1
    assert "/no/such/key.md" in done.stderr and "no such document" in done.stderr
    result = json.loads(done.stdout)
    assert [r["key"] for r in result["removed"]] == [keys[0]] and result["removed"][0]["chunks_removed"] >= 1
    assert sorted(d["key"] for d in client.documents(collection)) == sorted(
        [keys[1], str((tmp_path / "three.md").resolve())])
    assert _chunks_of(client, collection, keys[0]) == []
    everything = run_ragq(env, "forget", "--all", "--collection", collection, "--json")
    assert everything.returncode == 0, everything.stderr
    assert len(json.loads(everything.stdout)["removed"]) == 2
    assert collection not in {c["collection"] for c in client.collections()}   # an empty collection is gone
    nothing = run_ragq(env, "forget", "--collection", collection)
    assert nothing.returncode == 2 and "keys" in nothing.stderr


def test_the_same_content_in_two_collections_is_kept_once_and_forgotten_apart(worker, client, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    tag = uuid.uuid4().hex[:6]
    path = tmp_path / "shared.md"
    path.write_text("# Shared\n\nThis paragraph is ingested into two collections.\n")
    for name in (f"x-{tag}", f"y-{tag}"):
        client.wait_for_job(client.submit_ingest(path, collection=name).job_id, timeout_s=120)
    key = str(path.resolve())
    assert _chunks_of(client, f"x-{tag}", key) == _chunks_of(client, f"y-{tag}", key) != []
    client.forget([key], collection=f"x-{tag}")
    assert _chunks_of(client, f"x-{tag}", key) == [] and _chunks_of(client, f"y-{tag}", key) != []


def test_an_explicit_key_names_one_document(client, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    from ragq.core.errors import BadInput

    (tmp_path / "a.md").write_text("# A\n\ntext\n")
    (tmp_path / "b.md").write_text("# B\n\ntext\n")
    with pytest.raises(BadInput, match="a key names one document"):
        client.submit_ingest([tmp_path / "a.md", tmp_path / "b.md"], key="both")


def test_sync_makes_the_inputs_the_collections_whole_truth(worker, client, ragq_home: Path, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    collection = f"sync-{uuid.uuid4().hex[:6]}"
    folder = tmp_path / "docs"
    folder.mkdir()
    for name in ("keep", "drop", "broken"):
        (folder / f"{name}.md").write_text(f"# {name.title()}\n\nThe {name} page of the handbook.\n")
    _ingest(ragq_home, str(folder), "--collection", collection)
    assert len(client.documents(collection)) == 3
    (folder / "drop.md").unlink()
    (folder / "broken.md").write_bytes(b"")          # fails this time: its previous version must stay
    (folder / "new.md").write_text("# New\n\nA page added since.\n")
    done = run_ragq(ragq_env(ragq_home), "ingest", str(folder), "--collection", collection, "--sync", "--wait",
                    "--json")
    assert done.returncode == 1 and "broken.md" in done.stderr
    keys = sorted(Path(d["key"]).name for d in client.documents(collection))
    assert keys == ["broken.md", "keep.md", "new.md"]
    # nothing ingested (a wrong path): the collection stays as it was
    wrong = run_ragq(ragq_env(ragq_home), "ingest", str(tmp_path / "no-such-folder"), "--collection", collection,
                     "--sync", "--wait")
    assert wrong.returncode != 0
    assert len(client.documents(collection)) == 3


def test_a_later_submission_of_a_key_wins_a_race(db_engine) -> None:  # type: ignore[no-untyped-def]
    """Two ingests of one key finishing out of order end with the later submission's version, never a mix."""
    from tasks.versions import current_version, switch_key

    tag = uuid.uuid4().hex[:8]
    with db_engine.begin() as conn:
        for version in ("v1", "v2"):
            conn.execute(text("INSERT INTO documents (id, name, source, format, meta) "
                              "VALUES (:id, 'race', 'race', 'text', '{}')"), {"id": f"{version}-{tag}"})
    with db_engine.begin() as conn:   # the later submission (item 20) stores first ...
        assert switch_key(conn, f"race-{tag}", "doc", f"v2-{tag}", "job-b", 20)
    with db_engine.begin() as conn:   # ... the earlier one (item 10) finishes after it and changes nothing
        assert not switch_key(conn, f"race-{tag}", "doc", f"v1-{tag}", "job-a", 10)
        assert current_version(conn, f"race-{tag}", "doc") == f"v2-{tag}"
        left = conn.execute(text("SELECT id FROM documents WHERE id = ANY(:ids)"),
                            {"ids": [f"v1-{tag}", f"v2-{tag}"]}).scalars().all()
    assert left == [f"v2-{tag}"]   # the losing version is not kept
    with db_engine.begin() as conn:
        conn.execute(text("DELETE FROM doc_keys WHERE collection = :c"), {"c": f"race-{tag}"})
        conn.execute(text("DELETE FROM documents WHERE id = :id"), {"id": f"v2-{tag}"})


def test_bad_inputs_to_the_new_commands_are_clear_and_change_nothing(worker, client, ragq_home: Path, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    env = ragq_env(ragq_home)
    collection = f"bad-{uuid.uuid4().hex[:6]}"
    (tmp_path / "kept.md").write_text("# Kept\n\nThis one stays.\n")
    _ingest(ragq_home, str(tmp_path / "kept.md"), "--collection", collection)
    (tmp_path / "q.txt").write_text("What stays?\n")
    for args in (("ask", "anything?", "--collection", "no-such-thing"), ("docs", "--collection", "no-such-thing"),
                 ("forget", "x", "--collection", "no-such-thing"),
                 ("questions", str(tmp_path / "q.txt"), "--collection", "nope-x")):
        done = run_ragq(env, *args)
        assert done.returncode == 2, (args, done.stdout, done.stderr)
        assert "no collection named" in done.stderr and "ragq collections" in done.stderr
    empty = run_ragq(env, "forget", "", "--collection", collection)
    assert empty.returncode == 2 and "not a document key" in empty.stderr
    both = run_ragq(env, "forget", "k", "--all", "--collection", collection)
    assert both.returncode == 2 and "not both" in both.stderr
    assert len(client.documents(collection)) == 1   # nothing was removed by the refused commands
