-- One row per kind of exclusive run (the scheduler's tick): which replica runs
-- it and until when. Taking it and recording the tick is one statement, so a
-- tick with nothing due costs three round trips (begin, probe, finish). A
-- replica that dies mid-tick holds it until `until`; the claims themselves are
-- row-locked, so two overlapping ticks could waste work but never pause twice.
CREATE TABLE run_leases (
    name    text PRIMARY KEY,
    holder  text NOT NULL,
    until   timestamptz NOT NULL
);
