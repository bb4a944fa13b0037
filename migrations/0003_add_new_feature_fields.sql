-- migrate:up
ALTER TABLE loan ADD COLUMN new_field VARCHAR(50);
ALTER TABLE payment ADD COLUMN new_field INTEGER DEFAULT 0;

-- migrate:down
ALTER TABLE payment DROP COLUMN new_field;
ALTER TABLE loan DROP COLUMN new_field;
