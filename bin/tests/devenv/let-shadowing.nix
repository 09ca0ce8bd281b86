{ pkgs, ... }:

let
  git = pkgs.gitFull;
  tools = [ pkgs.ripgrep ];
in
{
  # `git` is the let binding, not pkgs.git: not guessed.
  packages = with pkgs; [ git ripgrep fd ] ++ tools;

  services.mongodb = {
    enable = true;
    additionalArgs = [ "--port" "27018" ];
  };

  enterTest = ''
    wait_for_port 27017
  '';
}
