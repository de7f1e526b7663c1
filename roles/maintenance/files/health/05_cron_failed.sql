-- Failed pg_cron runs in the last hours (read-only; roles/maintenance, tasks/health.yml). Only run
-- when pg_cron is installed here and this role may read cron.job_run_details. Row-level security
-- shows a non-superuser the runs of its own jobs (the jobs the schedule role installed).
WITH failed AS (
    SELECT d.jobid, j.jobname, d.runid, d.status, d.start_time, d.end_time, left(d.return_message, 300) AS return_message,
           left(d.command, 120) AS command
    FROM cron.job_run_details AS d
    LEFT JOIN cron.job AS j ON j.jobid = d.jobid
    WHERE d.status = 'failed'
      AND coalesce(d.start_time, d.end_time) > now() - make_interval(hours => %(hours)s)
)

SELECT jsonb_build_array(jsonb_build_object(
    'check', 'cron_failed_runs',
    'severity', CASE WHEN count(*) > 0 THEN %(severity)s ELSE 'ok' END,
    'summary', CASE WHEN count(*) = 0
        THEN 'no failed pg_cron run in the last ' || %(hours)s || ' h ('
             || (SELECT count(*) FROM cron.job_run_details AS d
                 WHERE coalesce(d.start_time, d.end_time) > now() - make_interval(hours => %(hours)s)) || ' run(s))'
        ELSE count(*) || ' failed pg_cron run(s) in the last ' || %(hours)s || ' h, latest: '
             || (array_agg(coalesce(f.jobname, 'job ' || f.jobid) || ' at ' || f.start_time::text || ': '
                           || coalesce(f.return_message, '') ORDER BY f.start_time DESC))[1]
    END,
    'rows', coalesce((SELECT jsonb_agg(to_jsonb(x)) FROM (SELECT * FROM failed ORDER BY start_time DESC LIMIT %(max_rows)s) AS x),
                     '[]'))) AS findings
FROM failed AS f;
