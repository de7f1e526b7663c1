-- Guide Maintenance Operations, Monthly: check retention policies.
-- when: any
SELECT * FROM app_retention_policies;
