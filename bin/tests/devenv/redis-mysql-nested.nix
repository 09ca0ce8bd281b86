# A devenv.nix without a function header: only literals.
{
  services = {
    redis.enable = true;
    redis.port = 6380;
    redis.bind = "0.0.0.0";
    mysql = {
      enable = true;
      settings.mysqld.port = 3307;
      settings.mysqld.max_connections = 200;
      initialDatabases = [ { name = "app"; schema = ./schema.sql; } ];
      ensureUsers = [ ];
    };
    memcached.enable = false;
  };
  env = {
    REDIS_DB = 0;
    "APP_ENV" = "dev";
  };
  processes = {
    worker = {
      exec = "bin/worker --queue default";
      process-compose.depends_on.redis.condition = "process_healthy";
    };
  };
}
