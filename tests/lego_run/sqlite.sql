-- A large in-memory database under lego-run; results are checked by the test script.
CREATE TABLE t(id INTEGER PRIMARY KEY, grp INTEGER, payload BLOB);
WITH RECURSIVE n(i) AS (SELECT 1 UNION ALL SELECT i + 1 FROM n WHERE i < 120000)
INSERT INTO t SELECT i, i % 97, randomblob(400) FROM n;
CREATE INDEX t_grp ON t(grp);
SELECT count(*), sum(id), sum(length(payload)) FROM t;
SELECT count(*) FROM t WHERE grp = 42;
PRAGMA integrity_check;
