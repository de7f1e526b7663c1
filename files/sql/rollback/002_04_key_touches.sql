-- Rollback of Phase 2 / step 4: the key-touch table of the integrity triggers (issue 18).
-- squawk-ignore-file ban-drop-table -- a rollback: it removes exactly the tables 002_04 creates

DROP TABLE IF EXISTS dbops.p2_key_touches_prune;
DROP TABLE IF EXISTS dbops.p2_key_touches;
