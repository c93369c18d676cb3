"""PostgreSQL: aigc_rate_take, one call that takes a place in a key's rate-limit window (lock the key, read its
window, add the request when it fits), so a request's limit check is one round trip instead of five

Revision ID: 0008
Revises: 0007
Create Date: 2026-12-04
"""
from alembic import op


revision = '0008'
down_revision = '0007'
branch_labels = None
depends_on = None

# Each statement of a VOLATILE PL/pgSQL function takes a fresh snapshot (READ COMMITTED): the window is read after the
# key's lock is held, so it includes every request admitted before. The rule is serve.ratelimit.decide's: admitted when
# the window's requests + 1 <= rpm and its tokens + the request's <= tpm. The rows returned are the window before it.
TAKE = """
CREATE OR REPLACE FUNCTION aigc_rate_take(k text, lo bigint, now_slot bigint, rpm bigint, tpm bigint, want bigint)
RETURNS TABLE (w_slot bigint, w_requests bigint, w_tokens bigint) LANGUAGE plpgsql VOLATILE AS $$
DECLARE used_r bigint; used_t bigint;
BEGIN
  PERFORM pg_advisory_xact_lock(hashtextextended(k, 0));
  RETURN QUERY SELECT s.slot, s.requests::bigint, s.tokens FROM rate_slots s WHERE s.key = k AND s.slot > lo;
  SELECT COALESCE(SUM(s.requests), 0), COALESCE(SUM(s.tokens), 0) INTO used_r, used_t
    FROM rate_slots s WHERE s.key = k AND s.slot > lo;
  IF used_r + 1 <= rpm AND used_t + want <= tpm THEN
    INSERT INTO rate_slots AS r (key, slot, requests, tokens) VALUES (k, now_slot, 1, want)
      ON CONFLICT (key, slot) DO UPDATE SET requests = r.requests + 1, tokens = r.tokens + excluded.tokens;
  END IF;
END $$
"""


def upgrade() -> None:
    if op.get_bind().dialect.name == "postgresql":
        op.execute(TAKE)


def downgrade() -> None:
    if op.get_bind().dialect.name == "postgresql":
        op.execute("DROP FUNCTION IF EXISTS aigc_rate_take(text, bigint, bigint, bigint, bigint, bigint)")
