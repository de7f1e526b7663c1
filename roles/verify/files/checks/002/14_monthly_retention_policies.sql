-- Guide Maintenance Operations, Monthly: check retention policies.
-- when: any
-- kind: proof
SELECT * FROM app_retention_policies;
