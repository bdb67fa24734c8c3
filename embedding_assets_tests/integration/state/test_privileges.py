"""Running as the role a DBA would grant: each documented grant set works, each missing
privilege is named with the SQL that grants it before any embedder call, write-back under
row-level security records the rows it could not update. Real roles on the embedded
Postgres, each test in a database of its own; an OpenAI-compatible server on 127.0.0.1
counts what is embedded."""

import json
import uuid

import pytest
import sqlalchemy as sa
from click.testing import CliRunner
from sqlalchemy.engine import make_url

from embedding_assets.cli.main import main
from embedding_assets.state.db import engine_for
from embedding_assets_tests.fakes.provider_server import ProviderServer
from embedding_assets_tests.integration.helpers import (
    create_docs_table,
    create_login_role,
    dagster_database,
    fake_embedder_settings,
)
from embedding_assets_tests.integration.state.test_upgrade import own_database

ROWS = 40


def execute(url: str, *statements: str) -> None:
    with engine_for(url).begin() as conn:
        for statement in statements:
            conn.execute(sa.text(statement))


class Deployment:
    """A database of its own, a `docs` table owned by the superuser (the DBA), and a login
    role for the tool with nothing granted yet."""

    def __init__(self, postgres: str, tmp_path, monkeypatch, fake: ProviderServer):
        self.dba = own_database(postgres)
        self.role = f"tool_{uuid.uuid4().hex[:8]}"
        execute(self.dba, create_login_role(self.dba, self.role))
        self.url = make_url(self.dba).set(username=self.role).render_as_string(False)
        create_docs_table(
            self.dba,
            "docs",
            [{"id": i, "title": f"T{i}", "body": f"b{i}"} for i in range(1, ROWS + 1)],
        )
        self.tmp_path, self.fake = tmp_path, fake
        monkeypatch.setenv("DATABASE_URL", self.url)
        # Dagster's runs and events in a database of their own (the documented deployment).
        monkeypatch.setenv("EMBEDDING_ASSETS_DAGSTER_PG_URL", dagster_database(postgres))

    def sources(self, **source: str):
        options = {"shards": "2", "pgvector": "{table: vec.docs_embeddings}", **source}
        path = fake_embedder_settings(self.tmp_path, "docs", self.fake.base_url, {}, options)
        return str(path)

    def grant_basics(self, *more: str) -> None:
        """SELECT on the source and both schemas made by the DBA for the role, then `more`."""
        execute(
            self.dba,
            f"GRANT SELECT ON docs TO {self.role}",
            f"CREATE SCHEMA embedding_assets AUTHORIZATION {self.role}",
            f"CREATE SCHEMA vec AUTHORIZATION {self.role}",
            *more,
        )

    def cli(self, path: str, *args: str):
        return CliRunner().invoke(main, ["--sources", path, *args])

    def embedded(self) -> int:
        return sum(len(r.inputs) for r in self.fake.requests if r.status == 200)


@pytest.fixture
def deployment(postgres, home, tmp_path, monkeypatch, fake):
    return Deployment(postgres, tmp_path, monkeypatch, fake)


def test_diff_grant_set_schemas_made_by_the_dba_and_select_on_the_source(deployment, home):
    d = deployment
    d.grant_basics()
    path = d.sources(change_capture="diff")
    doctor = d.cli(path, "doctor")
    assert doctor.exit_code == 0, doctor.output
    assert ": ok" in doctor.output
    synced = d.cli(path, "sync")
    assert synced.exit_code == 0, synced.output
    assert d.embedded() == ROWS
    status = json.loads(d.cli(path, "status", "--json").output)[0]
    assert (status["embedded_rows"], status["pending_rows"]) == (ROWS, 0)
    # The embedded Qdrant store holds chunk text: this user only.
    assert (home / "qdrant").stat().st_mode & 0o777 == 0o700


def test_each_missing_privilege_is_named_with_its_fix_before_any_embedding(deployment, monkeypatch):
    d = deployment
    path = d.sources(change_capture="diff")
    # Dagster's storage in the data database: its tables need CREATE on schema public.
    monkeypatch.delenv("EMBEDDING_ASSETS_DAGSTER_PG_URL")
    doctor = d.cli(path, "doctor", "--json")
    assert any(
        "EMBEDDING_ASSETS_DAGSTER_PG_URL" in m["fix"]
        for m in json.loads(doctor.output)[0]["missing"]
    )
    monkeypatch.setenv("EMBEDDING_ASSETS_DAGSTER_PG_URL", dagster_database(d.dba))
    doctor = d.cli(path, "doctor", "--json")
    assert doctor.exit_code == 1
    fixes = [m["fix"] for m in json.loads(doctor.output)[0]["missing"]]
    assert f'CREATE SCHEMA "embedding_assets" AUTHORIZATION "{d.role}";' in fixes
    assert f'GRANT SELECT ON "public"."docs" TO "{d.role}";' in fixes
    assert f'CREATE SCHEMA "vec" AUTHORIZATION "{d.role}";' in fixes
    synced = d.cli(path, "sync")
    assert synced.exit_code == 1 and "Traceback" not in synced.output
    assert "GRANT SELECT ON" in synced.output and len(synced.output.strip().splitlines()) == 1
    assert d.embedded() == 0

    # The schemas exist now, but vec belongs to another role: USAGE and CREATE on it.
    execute(
        d.dba,
        f"GRANT SELECT ON docs TO {d.role}",
        f"CREATE SCHEMA embedding_assets AUTHORIZATION {d.role}",
        "CREATE SCHEMA vec",
    )
    doctor = d.cli(path, "doctor", "--json")
    [missing] = json.loads(doctor.output)[0]["missing"]
    assert missing["fix"] == f'GRANT USAGE, CREATE ON SCHEMA "vec" TO "{d.role}";'
    synced = d.cli(path, "sync")
    assert synced.exit_code == 1 and "GRANT USAGE, CREATE ON SCHEMA" in synced.output
    assert d.embedded() == 0
    execute(d.dba, f"GRANT USAGE, CREATE ON SCHEMA vec TO {d.role}")
    assert d.cli(path, "sync").exit_code == 0
    assert d.embedded() == ROWS


def test_triggers_installed_by_a_dba_for_a_role_without_trigger_privilege(deployment):
    d = deployment
    execute(d.dba, f"GRANT SELECT ON docs TO {d.role}", f"CREATE SCHEMA vec AUTHORIZATION {d.role}")
    path = d.sources(change_capture="trigger")
    printed = d.cli(path, "triggers", "sql", "--source", "docs")
    assert printed.exit_code == 0, printed.output  # a role that may create nothing
    sql = printed.output
    assert f'OWNER TO "{d.role}"' in sql and "REVOKE EXECUTE ON FUNCTION" in sql
    with engine_for(d.dba).begin() as conn:
        conn.connection.driver_connection.cursor().execute(sql)
    doctor = d.cli(path, "doctor")
    assert doctor.exit_code == 0 and "WARNING" not in doctor.output, doctor.output
    assert d.cli(path, "sync").exit_code == 0
    assert d.embedded() == ROWS
    execute(d.dba, "INSERT INTO docs (id, title, body) VALUES (1000, 'new', 'row')")
    assert d.cli(path, "sync").exit_code == 0
    assert d.embedded() == ROWS + 1
    # A function left callable by PUBLIC (as an earlier version installed it) is warned of.
    execute(d.dba, "GRANT EXECUTE ON FUNCTION embedding_assets.capture_docs() TO PUBLIC")
    warned = d.cli(path, "doctor")
    assert "may be called by PUBLIC" in warned.output and "REVOKE EXECUTE" in warned.output
    execute(d.dba, "REVOKE EXECUTE ON FUNCTION embedding_assets.capture_docs() FROM PUBLIC")
    # PUBLIC may not call the capture function (it is SECURITY DEFINER).
    with engine_for(d.dba).connect() as conn:
        assert not conn.scalar(
            sa.text(
                "SELECT has_function_privilege('public', "
                "'embedding_assets.capture_docs()', 'EXECUTE')"
            )
        )


def test_write_back_under_row_level_security_records_the_rows_it_could_not_update(deployment):
    d = deployment
    d.grant_basics(
        "ALTER TABLE docs ADD COLUMN vec vector(8)",
        f"GRANT UPDATE (vec) ON docs TO {d.role}",
        "ALTER TABLE docs ENABLE ROW LEVEL SECURITY",
        f"CREATE POLICY see_all ON docs FOR SELECT TO {d.role} USING (true)",
        # Updates only of even ids: the odd ones the role sees but may not update.
        f"CREATE POLICY update_even ON docs FOR UPDATE TO {d.role} USING (id % 2 = 0)",
    )
    path = d.sources(change_capture="diff", write_back="{column: vec}")
    status = json.loads(d.cli(path, "status", "--json").output)[0]
    synced = d.cli(path, "sync")
    assert synced.exit_code == 1  # rows failed: said, and listed by `errors`
    assert f"{ROWS // 2} rows failed" in synced.output
    errors = json.loads(d.cli(path, "errors", "--json").output)
    assert len(errors) == ROWS // 2 and {e["kind"] for e in errors} == {"refused"}
    assert "row-level security" in errors[0]["message"]
    with engine_for(d.dba).connect() as conn:
        assert conn.scalar(sa.text("SELECT count(*) FROM docs WHERE vec IS NOT NULL")) == ROWS // 2
    status = json.loads(d.cli(path, "status", "--json").output)[0]
    assert status["row_level_security"] == [
        {"table": "public.docs", "row_level_security": True, "bypassed": False}
    ]
    assert status["failed_rows"] == ROWS // 2
    # The DBA fixes the policy; a replay and the next sync finish the rest.
    execute(d.dba, f"CREATE POLICY update_odd ON docs FOR UPDATE TO {d.role} USING (id % 2 = 1)")
    assert d.cli(path, "errors", "replay", "--all").exit_code == 0
    assert d.cli(path, "sync").exit_code == 0
    with engine_for(d.dba).connect() as conn:
        assert conn.scalar(sa.text("SELECT count(*) FROM docs WHERE vec IS NOT NULL")) == ROWS


def test_a_psycopg2_privilege_error_is_one_line_with_the_grant(deployment):
    from embedding_assets.cli.main import database_error_message

    d = deployment
    engine = sa.create_engine(make_url(d.url).set(drivername="postgresql+psycopg2"))
    with pytest.raises(sa.exc.DBAPIError) as caught, engine.connect() as conn:
        conn.execute(sa.text("SELECT * FROM docs"))
    engine.dispose()
    message = database_error_message(caught.value)
    assert "permission denied for table docs" in message
    assert f'GRANT SELECT ON docs TO "{d.role}"' in message
    assert "DATABASE_URL" not in message and "\n" not in message


def test_row_level_security_turned_on_takes_effect_at_the_next_sync(deployment):
    """A policy that hides rows from the tool's role is noticed like a `where` edit: the
    next sync removes the hidden rows' vectors; lifted, they come back with nothing embedded
    (their vectors were kept). Trigger capture, which alone would never see it."""
    d = deployment
    execute(
        d.dba,
        f"GRANT SELECT, TRIGGER ON docs TO {d.role}",
        f"CREATE SCHEMA embedding_assets AUTHORIZATION {d.role}",
        f"CREATE SCHEMA vec AUTHORIZATION {d.role}",
    )
    path = d.sources(change_capture="trigger")
    assert d.cli(path, "sync").exit_code == 0
    assert d.embedded() == ROWS
    execute(
        d.dba,
        "ALTER TABLE docs ENABLE ROW LEVEL SECURITY",
        f"CREATE POLICY first_half ON docs FOR SELECT TO {d.role} USING (id <= {ROWS // 2})",
    )
    status = json.loads(d.cli(path, "status", "--json").output)[0]
    assert status["config_changes"] == {"database.row_level_security": "eligibility"}
    assert d.cli(path, "sync").exit_code == 0
    with engine_for(d.dba).connect() as conn:
        stored = sa.text("SELECT count(DISTINCT row_id) FROM vec.docs_embeddings")
        assert conn.scalar(stored) == ROWS // 2
    execute(d.dba, "ALTER TABLE docs DISABLE ROW LEVEL SECURITY")
    assert d.cli(path, "sync").exit_code == 0
    with engine_for(d.dba).connect() as conn:
        assert conn.scalar(stored) == ROWS
    assert d.embedded() == ROWS  # the rows that came back were not embedded again


def test_write_back_grant_sets_side_table_and_a_missing_column_grant(deployment):
    d = deployment
    d.grant_basics(
        "ALTER TABLE docs ADD COLUMN vec vector(8)",
    )
    # Into the source: the owner added the column, but UPDATE on it was not granted.
    into_source = d.sources(change_capture="diff", write_back="{column: vec}")
    doctor = d.cli(into_source, "doctor", "--json")
    [missing] = json.loads(doctor.output)[0]["missing"]
    assert missing["fix"] == f'GRANT UPDATE ("vec") ON "public"."docs" TO "{d.role}";'
    synced = d.cli(into_source, "sync")
    assert synced.exit_code == 1 and "GRANT UPDATE" in synced.output
    assert d.embedded() == 0
    # A side table in a schema the role owns: nothing more to grant.
    side = d.sources(change_capture="diff", write_back="{column: vector, table: vec.docs_vectors}")
    assert d.cli(side, "doctor").exit_code == 0
    assert d.cli(side, "sync").exit_code == 0
    with engine_for(d.dba).connect() as conn:
        assert conn.scalar(sa.text("SELECT count(vector) FROM vec.docs_vectors")) == ROWS
