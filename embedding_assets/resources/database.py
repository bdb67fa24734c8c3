import dagster as dg
import sqlalchemy as sa
from pydantic import Field

from embedding_assets.state.db import engine_for


class DatabaseResource(dg.ConfigurableResource):
    """The PostgreSQL database holding the sources, the pgvector tables and the row state."""

    url: str = Field(description="postgresql:// URL; set from DATABASE_URL via dg.EnvVar")

    def engine(self) -> sa.Engine:
        return engine_for(self.url)
